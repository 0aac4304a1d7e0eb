"""Independent reference computations shared by tests."""

import numpy as np


def conv_matrix(kernel, input_shape, stride, pad):
  """Brute-force (out_size, in_size) matrix of a zero-padded strided conv.

  Cross-correlation, NHWC/HWIO, row-major flattening of (H, W, C); built
  from loops over output pixels and kernel taps, sharing no code with the
  library (`LinearOperator`, the layers).
  """
  kernel = np.asarray(kernel, np.float64)
  kh, kw, c_in, c_out = kernel.shape
  h, w, _ = input_shape
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (w + 2 * pad - kw) // stride + 1
  m = np.zeros((ho * wo * c_out, h * w * c_in))
  for i in range(ho):
    for j in range(wo):
      rows = slice((i * wo + j) * c_out, (i * wo + j + 1) * c_out)
      for a in range(kh):
        for b in range(kw):
          r, c = i * stride + a - pad, j * stride + b - pad
          if 0 <= r < h and 0 <= c < w:
            cols = slice((r * w + c) * c_in, (r * w + c + 1) * c_in)
            m[rows, cols] += kernel[a, b].T
  return m, (ho, wo, c_out)
