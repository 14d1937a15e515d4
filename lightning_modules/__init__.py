"""Lightning modules: the video-LLM, the alignment losses and the alignment LightningModule."""
