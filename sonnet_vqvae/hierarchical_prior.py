"""VQ-VAE-2's prior: one gated PixelCNN per level, finer levels conditioned.

Razavi et al. (2019) model p(top) p(bottom | top): the top grid with an
autoregressive prior of its own, every finer grid with one conditioned on the
codes of all coarser levels. Here each coarser level's codes are embedded,
upsampled to the finer grid (each code repeated over the 2**k x 2**k patch it
covers), summed and refined by residual 3x3 convolutions; the result is the
spatial condition of that level's `GatedPixelCNN`. Sampling is ancestral,
top-down. Levels are listed top first, as `HierarchicalVQVAE.encode` gives
them.
"""

from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from sonnet_vqvae import pixelcnn


class Conditioner(pixelcnn.EagerModule):
  """Maps the codes of coarser levels to features on a finer level's grid.

  Its output at every position depends on the coarser codes only, never on
  the finer grid's own codes, so it can condition that grid's PixelCNN
  without breaking its causality.
  """

  def __init__(self,
               num_embeddings: Sequence[int],
               channels: int,
               num_blocks: int = 2,
               name: Optional[str] = None):
    """Constructs the conditioner; all variables are created here.

    Args:
      num_embeddings: codebook size of each coarser level, top first.
      channels: C, the width of the embeddings and of the output.
      num_blocks: residual 3x3 convolution blocks after the sum of the
        upsampled embeddings (they mix neighbouring coarse codes).
      name: module name.

    Raises:
      ValueError: for no coarser level or a size that is not positive.
    """
    super().__init__(name=name)
    if not num_embeddings:
      raise ValueError("num_embeddings must name at least one coarser level.")
    pixelcnn.check_positive(channels=channels, num_blocks=num_blocks,
                             **{f"num_embeddings[{i}]": k
                                for i, k in enumerate(num_embeddings)})
    with self.name_scope:
      self.embeddings = [
          tf.Variable(tf.random.truncated_normal([k, channels]),
                      name=f"embeddings_{i}")
          for i, k in enumerate(num_embeddings)]
      self.blocks = [self._conv_params([3, 3, channels, channels],
                                       f"block_{i}")
                     for i in range(num_blocks)]

  def __call__(self, codes: Sequence[tf.Tensor], height: int,
               width: int) -> tf.Tensor:
    """Features of the coarser codes on a height x width grid.

    Args:
      codes: the coarser levels' [B, h_i, w_i] int grids, top first; height
        and width must be multiples of every h_i and w_i.
      height: H of the finer grid.
      width: W of the finer grid.

    Returns:
      [B, H, W, C] float32 features.
    """
    if len(codes) != len(self.embeddings):
      raise ValueError(f"The conditioner takes {len(self.embeddings)} coarser "
                       f"code grids, got {len(codes)}.")
    x = 0.
    for embeddings, grid in zip(self.embeddings, codes):
      rows, cols = grid.shape[1], grid.shape[2]
      if height % rows or width % cols:
        raise ValueError(f"A {rows}x{cols} code grid does not tile the "
                         f"{height}x{width} grid below it.")
      h = tf.gather(embeddings, grid)
      # Nearest-neighbour upsampling: a code covers its patch of the grid.
      h = tf.repeat(tf.repeat(h, height // rows, axis=1), width // cols, axis=2)
      x += h
    for kernel, bias in self.blocks:
      x += tf.nn.conv2d(tf.nn.relu(x), kernel, 1, "SAME") + bias
    return x


class HierarchicalPrior(pixelcnn.EagerModule):
  """p(codes) = prod over levels of p(level | coarser levels), top first."""

  def __init__(self,
               num_embeddings: Sequence[int],
               hidden_channels: int,
               num_layers: int,
               kernel_size: int,
               num_classes: Optional[int] = None,
               name: Optional[str] = "hierarchical_prior"):
    """Constructs one PixelCNN per level; all variables are created here.

    Args:
      num_embeddings: codebook size K of each level, top first.
      hidden_channels, num_layers, kernel_size: every level's
        `GatedPixelCNN`'s (and hidden_channels the conditioners' width).
      num_classes: if set, every level is class conditional.
      name: module name.

    Raises:
      ValueError: for no level or a bad size (see `GatedPixelCNN`).
    """
    super().__init__(name=name)
    if not num_embeddings:
      raise ValueError("num_embeddings must name at least one level.")
    self._num_embeddings = [int(k) for k in num_embeddings]
    self._num_classes = num_classes
    with self.name_scope:
      self.priors = [
          pixelcnn.GatedPixelCNN(
              k, hidden_channels, num_layers, kernel_size, num_classes,
              condition_channels=hidden_channels if level else None,
              name=f"level_{level}")
          for level, k in enumerate(self._num_embeddings)]
      self.conditioners = [
          Conditioner(self._num_embeddings[:level], hidden_channels,
                      name=f"conditioner_{level}")
          for level in range(1, self.num_levels)]

  @property
  def num_embeddings(self) -> List[int]:
    return list(self._num_embeddings)

  @property
  def num_classes(self) -> Optional[int]:
    return self._num_classes

  @property
  def num_levels(self) -> int:
    return len(self._num_embeddings)

  def _condition(self, level: int, codes: Sequence[tf.Tensor], height: int,
                 width: int) -> Optional[tf.Tensor]:
    if level == 0:
      return None
    return self.conditioners[level - 1](codes[:level], height, width)

  def __call__(self,
               codes: Sequence[tf.Tensor],
               labels: Optional[tf.Tensor] = None) -> List[tf.Tensor]:
    """Next-code logits of every level.

    Args:
      codes: each level's [B, H_i, W_i] int grid, top first.
      labels: [B] int class labels; required iff num_classes was set.

    Returns:
      Each level's [B, H_i, W_i, K_i] float32 logits: of every code given the
      codes before it in its grid, all codes of the coarser levels and the
      label.

    Raises:
      ValueError: for another number of grids than levels, or bad labels.
    """
    if len(codes) != self.num_levels:
      raise ValueError(f"The prior takes {self.num_levels} code grids (top "
                       f"first), got {len(codes)}.")
    return [prior(grid, labels,
                  self._condition(level, codes, grid.shape[1], grid.shape[2]))
            for level, (prior, grid) in enumerate(zip(self.priors, codes))]

  def sample(self,
             num_samples: int,
             shapes: Sequence[Tuple[int, int]],
             *,
             labels: Optional[tf.Tensor] = None,
             temperature: float = 1.0,
             seed: int = 0,
             given: Sequence[tf.Tensor] = ()) -> List[tf.Tensor]:
    """Draws every level's codes, ancestrally, top level first.

    Each level is sampled position by position given the levels already
    drawn; the same seed gives the same grids. With `given`, the top
    levels are not drawn but taken from it, and only the finer ones are
    sampled given them: e.g. an image's own top codes with new bottom
    codes show what its top level carries.

    Args:
      num_samples: B, code grids per level.
      shapes: each level's (H_i, W_i), top first.
      labels: [B] (or scalar, broadcast) int labels; required iff the prior
        is class conditional.
      temperature: logits are divided by it; > 0, lower is greedier.
      seed: integer seed.
      given: the [B, H_i, W_i] int codes of the top len(given) levels, top
        first (fewer grids than levels).

    Returns:
      Each level's [B, H_i, W_i] int32 codes, top first (the given ones as
      given).

    Raises:
      ValueError: on another number of shapes than levels, bad labels, sizes
        or temperature, or given grids that are all the levels or do not
        have their level's shape.
    """
    if len(shapes) != self.num_levels:
      raise ValueError(f"shapes must give {self.num_levels} (height, width) "
                       f"pairs, top first; got {list(shapes)}.")
    pixelcnn.check_positive(num_samples=num_samples, **{
        f"shapes[{i}]": min(shape) for i, shape in enumerate(shapes)})
    labels, temperature = pixelcnn.sampling_args(
        num_samples, labels, self._num_classes, temperature)
    if len(given) >= self.num_levels:
      raise ValueError(f"given holds {len(given)} code grids; at most "
                       f"{self.num_levels - 1} (the top levels) can be given.")
    given = [tf.cast(g, tf.int32) for g in given]
    for level, grid in enumerate(given):
      if tuple(grid.shape) != (num_samples, *shapes[level]):
        raise ValueError(f"given[{level}] has shape {tuple(grid.shape)}, not "
                         f"{(num_samples, *shapes[level])}.")
    return self._sample(num_samples, tuple(tuple(s) for s in shapes), labels,
                        temperature, tf.constant([seed, 0], tf.int64), given)

  @tf.function(autograph=False)
  def _sample(self, num_samples, shapes, labels, temperature, seed, given):
    return self.sample_graph(num_samples, shapes, labels, temperature, seed,
                             given)

  def sample_graph(self, num_samples, shapes, labels, temperature,
                   seed, given=()) -> List[tf.Tensor]:
    """`sample`'s graph, for use inside a tf.function.

    Args:
      num_samples: B (Python int or scalar int32 tensor).
      shapes: each level's (H_i, W_i) as Python ints, top first.
      labels: [B] int32 labels, or None for an unconditional prior.
      temperature: scalar float32 tensor > 0 (not checked here).
      seed: [2] int64 stateless seed; level i draws with it folded with i.
      given: the top levels' int32 codes, taken instead of drawn.

    Returns:
      Each level's [B, H_i, W_i] int32 codes, top first.
    """
    codes = list(given)
    for level, (prior, (height, width)) in enumerate(zip(self.priors, shapes)):
      if level < len(given):
        continue
      codes.append(prior.sample_graph(
          num_samples, height, width, labels, temperature,
          tf.random.experimental.stateless_fold_in(seed, level),
          self._condition(level, codes, height, width)))
    return codes
