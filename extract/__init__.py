"""Stage one, part 1: datasets, timm backbones, the frozen forward pass that fills the cache."""
