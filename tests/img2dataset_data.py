"""Real img2dataset output for tests: source images of mixed sizes, aspect ratios and formats
(made from the checked-in emoji), served over HTTP on 127.0.0.1, downloaded by the real
`img2dataset` command line into webdataset shards with their parquet and `_stats.json` files,
exactly as users get them from a LAION-style URL list.

img2dataset runs from its own venv (`make install` builds it; its pins conflict with ours).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "emoji64"
IMG2DATASET = ROOT / ".venv" / "img2dataset" / "bin" / "img2dataset"

# (width, height): square, both orientations, 2:1 and 4:3 in both directions, a small one
# below a typical min-size filter and an extreme 4:1 banner.
SIZES = [(64, 64), (96, 48), (48, 96), (128, 64), (80, 60), (60, 80), (40, 40), (200, 50)]
FORMATS = ["JPEG", "PNG", "WEBP"]  # 8 sizes x 3 formats: every pairing within 24 images
BACKGROUNDS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 50),
    "grey": (128, 128, 128),
    "purple": (120, 50, 160),
}
EXTRA_COLUMNS = ["aesthetic", "punsafe", "pwatermark", "similarity", "caption_recaptioned"]
BROKEN = b"<html><body>this is not an image</body></html>"


class Img2datasetMissing(RuntimeError):
    """img2dataset's venv is not built."""


def img2dataset_missing() -> str | None:
    """Why the img2dataset command line cannot run here, or None when it can."""
    if IMG2DATASET.is_file():
        return None
    return (
        f"{IMG2DATASET.relative_to(ROOT)} is missing: run `make install` "
        "(it builds img2dataset's own venv)"
    )


def fixture_captions() -> dict[str, str]:
    """File name -> caption ("an emoji of grapes") of the checked-in emoji."""
    lines = (FIXTURE_IMAGES / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["file"]: row["caption"] for row in map(json.loads, filter(None, lines))}


def _source_image(emoji: Path, size: tuple[int, int], fmt: str, background: str) -> bytes:
    """The emoji, scaled to fit the canvas's shorter side, centred on a `size` canvas. PNGs keep
    a transparent background (img2dataset mattes alpha onto white); the others are opaque."""
    width, height = size
    side = min(width, height)
    glyph = Image.open(emoji).convert("RGBA").resize((side, side), Image.Resampling.LANCZOS)
    if fmt == "PNG":
        canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    else:
        canvas = Image.new("RGBA", size, (*BACKGROUNDS[background], 255))
    canvas.alpha_composite(glyph, ((width - side) // 2, (height - side) // 2))
    if fmt != "PNG":
        canvas = canvas.convert("RGB")
    out = io.BytesIO()
    canvas.save(out, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return out.getvalue()


def make_sources(num_images: int, seed: int = 0) -> list[dict]:
    """The rows of the URL list, in order: `num_images` valid images, 2 URLs serving bytes that
    are no image and 1 that answers 404, spread over the list. Each row has the path it is
    served at, its body (None: 404), caption, LAION-style scores and, for images, its size."""
    rng = random.Random(seed)
    captions = fixture_captions()
    files = sorted(captions)
    rows: list[dict] = []
    for i in range(num_images):
        file = files[rng.randrange(len(files))]
        size, fmt = SIZES[i % len(SIZES)], FORMATS[i % len(FORMATS)]
        background = rng.choice(sorted(BACKGROUNDS))
        name = captions[file].removeprefix("an emoji of ")
        shown_on = "white" if fmt == "PNG" else background
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        rows.append(
            {
                "path": f"/img/{i:04d}.{ext}",
                "body": _source_image(FIXTURE_IMAGES / file, size, fmt, background),
                "content_type": f"image/{fmt.lower()}",
                "caption": captions[file],
                "caption_recaptioned": f"a picture of {name} on a {shown_on} background",
                "size": size,
                "format": fmt,
            }
        )
    failures = [
        {"path": "/broken/0.jpg", "body": BROKEN, "content_type": "image/jpeg"},
        {"path": "/broken/1.png", "body": BROKEN[:7], "content_type": "image/png"},
        {"path": "/missing/0.jpg", "body": None, "content_type": None},
    ]
    for n, failure in enumerate(failures):
        # At a quarter, half and three quarters of the list: failures land in several shards.
        position = (n + 1) * len(rows) // (len(failures) + 1)
        rows.insert(position, {**failure, "caption": "an emoji that is not there", "size": None})
        rows[position]["caption_recaptioned"] = "a picture that is not there"
    for row in rows:
        row["aesthetic"] = round(rng.uniform(3.0, 7.0), 4)
        row["punsafe"] = round(rng.random(), 4)
        row["pwatermark"] = round(rng.random(), 4)
        row["similarity"] = round(rng.uniform(0.2, 0.4), 4)
    return rows


@contextmanager
def serve(rows: list[dict]) -> Iterator[str]:
    """Serve each row's body at its path from 127.0.0.1 on a free port (a row without a body,
    and any other path, answers 404); yields the base URL. Stopped on leaving, also on error."""
    bodies = {row["path"]: row for row in rows if row["body"] is not None}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            row = bodies.get(self.path)
            if row is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", row["content_type"])
            self.send_header("Content-Length", str(len(row["body"])))
            self.end_headers()
            self.wfile.write(row["body"])

        def log_message(self, *args) -> None:
            pass  # one line per request on stderr is noise in test output

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def write_url_list(rows: list[dict], base_url: str, path: Path) -> Path:
    """The URL list as a LAION-style parquet: url, caption, the scores and an alternative
    caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "url": pa.array([base_url + row["path"] for row in rows], pa.string()),
        "caption": pa.array([row["caption"] for row in rows], pa.string()),
        **{col: pa.array([row[col] for row in rows], pa.float64()) for col in EXTRA_COLUMNS[:4]},
        "caption_recaptioned": pa.array([row["caption_recaptioned"] for row in rows], pa.string()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _tool_env() -> dict[str, str]:
    """This environment without what would point img2dataset's interpreter at ours, with
    127.0.0.1 never sent to a proxy and no update check, telemetry or wandb run."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    }
    no_proxy = ",".join(filter(None, [env.get("no_proxy", ""), "127.0.0.1", "localhost"]))
    env.update(
        no_proxy=no_proxy,
        NO_PROXY=no_proxy,
        NO_ALBUMENTATIONS_UPDATE="1",  # else albumentations asks PyPI for a newer version
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        DO_NOT_TRACK="true",
    )
    return env


def build_img2dataset_output(
    out_dir: Path,
    num_images: int = 48,
    samples_per_shard: int = 16,
    seed: int = 0,
    encode_format: str = "jpg",
) -> dict:
    """Download `num_images` served images plus 3 failing URLs with the real img2dataset into
    `out_dir / "img2dataset"` (webdataset shards, original sizes kept, the LAION-style
    columns saved in each sample's JSON). Returns a summary: `output_dir`, `url_list`, sorted
    `tars`, `parquets` and `stats` paths, `successes` and `failures` (summed over the stats
    files), `sizes` (width, height of each valid image, in URL-list order), `rows` (every
    URL-list row: url, caption, size or None for a failing one), `seconds` (the download).
    Raises RuntimeError with img2dataset's output when it fails."""
    missing = img2dataset_missing()
    if missing:
        raise Img2datasetMissing(missing)
    out_dir = Path(out_dir)
    rows = make_sources(num_images, seed)
    output = out_dir / "img2dataset"
    with serve(rows) as base_url:
        url_list = write_url_list(rows, base_url, out_dir / "urls" / "urls.parquet")
        command = [
            str(IMG2DATASET),
            f"--url_list={url_list}",
            f"--output_folder={output}",
            "--input_format=parquet",
            "--url_col=url",
            "--caption_col=caption",
            f"--save_additional_columns={json.dumps(EXTRA_COLUMNS)}",
            "--output_format=webdataset",
            "--resize_mode=no",  # original sizes, so the aspect ratios survive
            f"--encode_format={encode_format}",
            f"--number_sample_per_shard={samples_per_shard}",
            "--processes_count=1",
            "--thread_count=4",
            "--enable_wandb=False",
            "--timeout=5",
            "--retries=0",
        ]
        start = time.perf_counter()
        result = subprocess.run(
            command,
            cwd=out_dir,
            env=_tool_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"img2dataset exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-5000:]}"
        )
    stats_files = sorted(output.glob("*_stats.json"))
    stats = [json.loads(path.read_text()) for path in stats_files]
    if not stats:
        raise RuntimeError(f"img2dataset wrote no stats:\n{result.stdout[-3000:]}")
    return {
        "output_dir": output,
        "url_list": url_list,
        "tars": sorted(output.glob("*.tar")),
        "parquets": sorted(output.glob("*.parquet")),
        "stats": stats_files,
        "successes": sum(s["successes"] for s in stats),
        "failures": sum(s["failed_to_download"] + s["failed_to_resize"] for s in stats),
        "sizes": [row["size"] for row in rows if row["size"] is not None],
        "rows": [
            {"url": base_url + row["path"], "caption": row["caption"], "size": row["size"]}
            for row in rows
        ],
        "seconds": seconds,
    }
