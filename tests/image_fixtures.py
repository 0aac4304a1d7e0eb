"""Small generated image folders for end-to-end tests."""

import os

import numpy as np
from PIL import Image


def write_image_folder(root, num_classes=4, per_class=48, size=8):
  """Classes are colour blobs at class-specific places plus noise."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  for split, n in (('train', per_class), ('test', per_class // 2)):
    for c in range(num_classes):
      folder = os.path.join(root, split, f'class_{c}')
      os.makedirs(folder)
      cy, cx = (c // 2) * (size - 1), (c % 2) * (size - 1)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (size / 2) ** 2)
      for i in range(n):
        img = 0.2 + 0.6 * blob[..., None] * np.eye(3)[c % 3]
        img = img + 0.08 * rng.normal(size=(size, size, 3))
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f'{i}.png'))
