"""The PyTorch frontends: eager modules, ATen graphs (torch.export programs) and .pt2 files."""
