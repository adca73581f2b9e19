import pytest
import torch

from fpet.config import ViTConfig

TINY = ViTConfig("vit_test_tiny", patch_size=4, embed_dim=32, depth=4, num_heads=2, img_size=32)
TINY_LS = ViTConfig("vit_test_tiny_ls", patch_size=4, embed_dim=32, depth=4, num_heads=2, img_size=32, layer_scale=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32)
