"""The GEDI model: energy, SGLD sampler, Sinkhorn, the loss terms, augmentations, the network and
the objective on a batch. Pure math and one ``nn.Module``; nothing here knows about logic."""
