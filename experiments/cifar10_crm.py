r"""CIFAR-10 with the CRM dynamic-margin loss and the LipLT bound.

arXiv 2310.00116 (see ../shared/papers/dynamic_margin_liplt_2310.00116_summary.md):
ReLU networks, LipLT pairwise bounds with gradients through them, lambda 15,
temperature 5, R0 0.2, plain cross-entropy for the first 10 epochs, Adam,
batch 512, 400 epochs.

  python -m experiments.main --config=experiments/cifar10_crm.py \
      --workdir=/tmp/cifar10_crm
  python -m experiments.main --config=experiments/cifar10_crm.py:data=offline,tiny
  # CLL trained with the LipLT bound on the same ReLU network:
  python -m experiments.main --config=experiments/cifar10_crm.py:loss=cll

Arguments: data ('tfds' or 'offline'), model ('6c2f', '4c3f'), bound
('liplt' or 'naive'), loss ('crm' or 'cll'), tiny.
"""

from cll_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, data='tfds', model='6c2f', bound='liplt',
                          loss='crm', tiny=False)
  c = configs.default_config()
  c.model.name = arg.model
  configs.set_cifar10_source(c, arg.data)
  configs.use_crm(c, crm_lambda=15.0, temperature=5.0, radius_threshold=0.2,
                  epochs=400, batch_size=512, bound=arg.bound)
  c.loss.epsilon = 36 / 255  # Reported radius; used for train-CRA metrics.
  if arg.loss == 'cll':  # CLL's CIFAR-10 settings (B4) on this network.
    c.loss.name = 'cll'
    c.loss.epsilon = 0.15
    c.loss.p_start = c.loss.p_end = 0.15
    c.loss.lam = 1e-4
  if arg.tiny:
    configs.make_tiny(c)
  return c
