"""Model builders and loaders: the UNet, the stage-1 autoencoders, text encoders, the
discriminator and LPIPS, the FID-style feature network, noise schedules and FLOP counting.
Only model code: imports `core`, never the data pipeline, Ray or DeepSpeed."""
