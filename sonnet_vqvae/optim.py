"""Adam (Kingma & Ba, 2015) that runs under every tf.distribute strategy.

`snt.optimizers.Adam` refuses strategies other than Sonnet's replicators, so
the trainers use `Adam` below: the same update rule (`adam_update`, tested
equal to Sonnet's), with its slots created by the caller's variable creator
(`distribute.replica_consistent_variables`) so that replica-context
assignments are valid under every strategy.
"""

from typing import Optional, Sequence, Tuple

import sonnet as snt
import tensorflow as tf

from sonnet_vqvae import loss_scale as loss_scale_lib


def adam_update(g: tf.Tensor, alpha: float, beta_1: float, beta_2: float,
                epsilon: float, t: tf.Tensor, m: tf.Tensor, v: tf.Tensor
                ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """One step of Algorithm 1 of the Adam paper, without state.

  Args:
    g: gradient.
    alpha: learning rate.
    beta_1: decay of the first moment.
    beta_2: decay of the second moment.
    epsilon: added to the root of the second moment.
    t: float step number, starting at 1.
    m: first moment before the step.
    v: second moment before the step.

  Returns:
    (update, m, v): the step to subtract from the parameter and the new moments.
  """
  m = beta_1 * m + (1. - beta_1) * g
  v = beta_2 * v + (1. - beta_2) * g * g
  m_hat = m / (1. - tf.pow(beta_1, t))
  v_hat = v / (1. - tf.pow(beta_2, t))
  return alpha * m_hat / (tf.sqrt(v_hat) + epsilon), m, v


class Adam(snt.Module):
  """Adam: `snt.optimizers.Adam`'s update under any strategy."""

  def __init__(self,
               learning_rate: float,
               beta1: float = 0.9,
               beta2: float = 0.999,
               epsilon: float = 1e-8,
               loss_scale: Optional[loss_scale_lib.DynamicLossScale] = None,
               name: str = "adam"):
    """Constructs the optimizer.

    Args:
      learning_rate: as in `snt.optimizers.Adam`.
      beta1: as in `snt.optimizers.Adam`.
      beta2: as in `snt.optimizers.Adam`.
      epsilon: as in `snt.optimizers.Adam`.
      loss_scale: for float16 training, the loss scale that the train step
        applies (checkpointed with the optimizer); None otherwise.
      name: module name.
    """
    super().__init__(name=name)
    self.learning_rate = learning_rate
    self.beta1 = beta1
    self.beta2 = beta2
    self.epsilon = epsilon
    self.loss_scale = loss_scale
    self.step = tf.Variable(0, trainable=False, dtype=tf.int64, name="t")
    self.m = []
    self.v = []

  def build(self, parameters: Sequence[tf.Variable]) -> None:
    """Creates the zero moments of `parameters` (call once, before `apply`)."""
    for slots, prefix in ((self.m, "m"), (self.v, "v")):
      slots.extend(
          tf.Variable(tf.zeros_like(p), trainable=False,
                      name=f"{prefix}/{p.name.split(':')[0]}")
          for p in parameters)

  def apply(self, updates: Sequence[tf.Tensor],
            parameters: Sequence[tf.Variable],
            apply_if: Optional[tf.Tensor] = None) -> None:
    """Applies one Adam step of `updates` (gradients) to `parameters`.

    Args:
      updates: gradients, one per parameter.
      parameters: the variables `build` was called with.
      apply_if: optional scalar bool; when False the step changes nothing
        (parameters, moments and step count), as loss scaling needs after a
        gradient overflow and the trainers' non-finite guard after a bad step.
    """
    if len(self.m) != len(parameters):
      raise ValueError(f"Adam was built for {len(self.m)} parameters, got "
                       f"{len(parameters)}.")

    def unless_skipped(new, old):
      # tf.where, not tf.cond: assignments inside tf.cond break under
      # MirroredStrategy. A skipped step's values may be inf/NaN; unselected.
      return new if apply_if is None else tf.where(apply_if, new, old)

    self.step.assign(unless_skipped(self.step + 1, self.step))
    t = tf.cast(self.step, tf.float32)
    for update, param, m, v in zip(updates, parameters, self.m, self.v):
      step, new_m, new_v = adam_update(
          g=update, alpha=self.learning_rate, beta_1=self.beta1,
          beta_2=self.beta2, epsilon=self.epsilon, t=t, m=m, v=v)
      m.assign(unless_skipped(new_m, m))
      v.assign(unless_skipped(new_v, v))
      param.assign(unless_skipped(param - step, param))
