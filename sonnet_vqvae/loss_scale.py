"""Dynamic loss scaling for float16 training (Micikevicius et al., 2018).

float16 has 5 exponent bits: small gradients underflow to zero. The loss is
multiplied by a large scale before differentiation and the gradients divided by
it after. When a step's gradients overflow (inf/NaN), that step is skipped and
the scale halved; after `growth_interval` finite steps in a row it is doubled.
"""

from typing import Sequence, Tuple

import sonnet as snt
import tensorflow as tf


class DynamicLossScale(snt.Module):
  """Loss scale that halves on overflow and doubles after a run of good steps.

  Works in replica context under any strategy without collectives of its own:
  pass it gradients that are already all-reduced, so that every replica sees the
  same overflow and makes the same update.

  Usage in a train step::

    with tf.GradientTape() as tape:
      loss = model(...)
      scaled = loss_scale.scale_loss(loss)
    grads = tape.gradient(scaled, params)
    grads, finite = loss_scale.update(grads)
    optimizer.apply(grads, params, apply_if=finite)
  """

  def __init__(self,
               initial_scale: float = 2.**15,
               growth_interval: int = 2000,
               multiplier: float = 2.,
               min_scale: float = 1.,
               name: str = "dynamic_loss_scale"):
    """Constructs the loss scale.

    Args:
      initial_scale: scale of the first step.
      growth_interval: finite steps in a row after which the scale grows.
      multiplier: factor of each growth and each reduction (> 1).
      min_scale: the scale never falls below this.
      name: module name.

    Raises:
      ValueError: if an argument is out of range.
    """
    super().__init__(name=name)
    if not min_scale > 0:
      raise ValueError(f"min_scale must be positive, got {min_scale}.")
    if not initial_scale >= min_scale:
      raise ValueError(f"initial_scale must be >= min_scale ({min_scale}), got "
                       f"{initial_scale}.")
    if growth_interval < 1:
      raise ValueError(
          f"growth_interval must be positive, got {growth_interval}.")
    if not multiplier > 1:
      raise ValueError(f"multiplier must be > 1, got {multiplier}.")
    self.growth_interval = growth_interval
    self.multiplier = multiplier
    self.min_scale = min_scale
    self.scale = tf.Variable(initial_scale, trainable=False, dtype=tf.float32,
                             name="scale")
    self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64,
                                  name="good_steps")

  def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
    """Returns `loss` (float32) times the current scale."""
    return tf.cast(loss, tf.float32) * self.scale

  def update(self, grads: Sequence[tf.Tensor]
             ) -> Tuple[Sequence[tf.Tensor], tf.Tensor]:
    """Unscales gradients of a scaled loss and adapts the scale.

    Args:
      grads: gradients of `scale_loss(loss)` (all-reduced across replicas).

    Returns:
      (grads / scale, all_finite): all_finite is a scalar bool, False when any
      gradient overflowed; the caller must then skip the update.
    """
    scale = self.scale.read_value()
    grads = [g / scale for g in grads]
    all_finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                                for g in grads])
    good_steps = tf.where(all_finite, self.good_steps + 1, 0)
    grow = good_steps >= self.growth_interval
    # tf.where, not tf.cond: assignments inside tf.cond break under
    # MirroredStrategy.
    new_scale = tf.where(
        all_finite,
        tf.where(grow, scale * self.multiplier, scale),
        tf.maximum(scale / self.multiplier, self.min_scale))
    self.scale.assign(new_scale)
    self.good_steps.assign(tf.where(grow, tf.zeros_like(good_steps),
                                    good_steps))
    return grads, all_finite
