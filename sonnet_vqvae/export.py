r"""Exports a trained run as a SavedModel that runs without this package.

    python -m sonnet_vqvae.export --workdir VQVAE_DIR --output DIR
    python -m sonnet_vqvae.export --workdir PRIOR_DIR --output DIR

The newest checkpoint of the workdir is restored and written as a
SavedModel: plain TensorFlow ops and variables, which `tf.saved_model.load`,
TF Serving and Keras 3's `keras.layers.TFSMLayer` read with neither
`sonnet_vqvae` nor Sonnet installed. Its signatures (all with a dynamic
batch; H, W, C the training images' shape, h, w the code grid's, K the
codebook size):

* `encode`: uint8 images [B, H, W, C] -> {"codes": int32 [B, h, w]};
* `encode_float`: float32 images in the training range [-0.5, 0.5] -> the
  same;
* `decode`: {"codes": int32 [B, h, w]} in [0, K) -> {"images": float32 in
  the training range, "images_uint8": uint8};
* `reconstruct`: uint8 images -> {"codes", "images", "images_uint8"};
* `sample` (a prior's workdir only): {"labels": int32 [B] (one class per
  image; for an unconditional prior only the count matters), "temperature":
  float32 scalar > 0, "seed": int64 scalar} -> {"codes", "images",
  "images_uint8"}; the same seed gives the same images. The autoregressive
  loop is a `tf.while_loop` in the graph, not Python.

A VQ-VAE-2 (`num_levels` > 1) is exported the same way with one code grid
per level: "codes_0" (the top level) to "codes_{L-1}" (the bottom) replace
"codes" in every signature's inputs and outputs, and `sample` (its prior's
workdir) draws them top-down. A residual quantizer's codes are one int32
[B, h, w, S] "codes" tensor, stage s in [..., s] and in [0, K) (K codes per
stage), as its `encoding_indices`; its prior's `sample` draws the stages in
order. FSQ's and LFQ's codes are indices like a VQ's, in [0, prod(levels))
and [0, 2**bits).

The quantizer's [B*h*w, K] outputs (`distances`, `encodings`) are in no
signature. Every signature checks its inputs in the graph, so a SavedModel
loaded without this package checks them too: images of another height, width
or channel count, code grids of another shape, a batch of 0 (B >= 1), labels
that are not a [B] vector of classes, codes out of [0, K) and a temperature
that is not a finite scalar > 0 raise `InvalidArgumentError` naming the
signature, the argument, what it must be and what it received, e.g. "encode:
images must have shape [B, 32, 32, 3] with B >= 1, received [2 64 64 3]". A
VQ-VAE-2's finer grids must have the top grid's batch. Another dtype fails
with TensorFlow's error naming the expected one. The loaded object's own
functions (`loaded.encode(...)`, not `loaded.signatures["encode"]`) also
refuse other static shapes by their `TensorSpec`.

The loaded object also holds `image_shape`, `code_shape` and
`num_embeddings` (int32 variables; a VQ-VAE-2's: [L, 2] and [L], top first).
"""

import functools
import glob
import os
import shutil
from typing import Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from sonnet_vqvae import cli
from sonnet_vqvae import hierarchical_prior
from sonnet_vqvae import input_pipeline
from sonnet_vqvae import loop
from sonnet_vqvae import networks
from sonnet_vqvae import pixelcnn
from sonnet_vqvae import rundir
from sonnet_vqvae import train


def _to_uint8(images: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.round(tf.clip_by_value(images + 0.5, 0., 1.) * 255.),
                 tf.uint8)


def _calling(concrete: tf.types.experimental.ConcreteFunction,
             function) -> callable:
  """A function of `function`'s arguments that calls `concrete`."""

  @functools.wraps(function)
  def call(*args, **kwargs):
    return concrete(*args, **kwargs)

  return call


class _Untracked:
  """Holds an object out of a tf.Module's saved object graph."""

  def __init__(self, module):
    self.module = module


class Exported(tf.Module):
  """The module `export_saved_model` saves: a VQ-VAE and optionally a prior."""

  def __init__(self, vqvae: networks.VQVAEModel,
               image_shape: Sequence[int],
               prior: Optional[Union[pixelcnn.GatedPixelCNN,
                                     hierarchical_prior.HierarchicalPrior]
                              ] = None,
               name: str = "sonnet_vqvae_export"):
    super().__init__(name=name)
    self.vqvae = vqvae
    # The prior's variables are saved, not the prior: its own `sample`
    # tf.function, never traced here, would be reported as "untraced
    # functions ... will not be directly callable" (signatures call it).
    self._prior = _Untracked(prior)
    self.prior_variables = list(prior.variables) if prior is not None else []
    image_shape = [int(n) for n in image_shape]
    encoded = vqvae.encode(tf.zeros([1, *image_shape]))
    # A VQ-VAE-2's codes are a list of grids (top first); a VQ-VAE's one.
    self._levels = len(encoded) if isinstance(encoded, list) else 1
    code_shapes = [[int(n) for n in c.shape[1:]]
                   for c in (encoded if self._levels > 1 else [encoded])]
    sizes = [q.num_embeddings
             for q in getattr(vqvae, "quantizers", [vqvae.quantizer])]
    one = self._levels == 1
    self.image_shape = tf.Variable(image_shape, trainable=False)
    self.code_shape = tf.Variable(code_shapes[0] if one else code_shapes,
                                  trainable=False)
    self.num_embeddings = tf.Variable(sizes[0] if one else sizes,
                                      trainable=False)
    self._image_shape, self._code_shapes = image_shape, code_shapes
    from sonnet_vqvae import prior as prior_lib  # pylint: disable=g-import-not-at-top
    # A residual quantizer's prior draws one [h, w] grid per stage.
    self._stages = prior_lib.num_stages(vqvae)
    self._grid_shapes = ([code_shapes[0][:-1]] * self._stages
                         if self._stages else code_shapes)
    self._sizes = sizes
    # Each graph is traced once, for inputs of any shape (`signatures`); the
    # object's own functions, of static shapes, call it.
    self._signatures = _Untracked({
        name: tf.function(function, autograph=False).get_concrete_function(
            *[tf.TensorSpec(None, spec.dtype, spec.name) for spec in specs])
        for name, (function, specs) in self._functions().items()})
    for name, (function, specs) in self._functions().items():
      setattr(self, name, tf.function(
          _calling(self._signatures.module[name], function),
          input_signature=specs, autograph=False))

  def _functions(self):
    """name -> (Python function, its input TensorSpecs) of every signature."""
    images = tf.TensorSpec([None, *self._image_shape], tf.uint8,
                           name="images")
    floats = tf.TensorSpec([None, *self._image_shape], tf.float32,
                           name="images")
    codes = [tf.TensorSpec([None, *shape], tf.int32, name=name)
             for shape, name in zip(self._code_shapes, self._code_names())]
    functions = {"encode": (self._encode_uint8, [images]),
                 "encode_float": (self._encode_float, [floats]),
                 "decode": (self._decode, codes),
                 "reconstruct": (self._reconstruct, [images])}
    if self.prior is not None:
      functions["sample"] = (self._sample, [
          tf.TensorSpec([None], tf.int32, name="labels"),
          tf.TensorSpec([], tf.float32, name="temperature"),
          tf.TensorSpec([], tf.int64, name="seed")])
    return functions

  def signature_names(self):
    return sorted(self._functions())

  @property
  def prior(self):
    return self._prior.module

  def signatures(self):
    """The serving signatures: name -> concrete function.

    Traced for inputs of any shape: a loaded SavedModel's signature does not
    check its inputs against its TensorSpecs, and the graph optimizer folds
    a check of what a static shape already says into True. The functions'
    own asserts check every shape and value, then fix the static shape.
    """
    return dict(self._signatures.module)

  def _code_names(self):
    """"codes", or a VQ-VAE-2's "codes_0" (top) ... "codes_{L-1}"."""
    if self._levels == 1:
      return ["codes"]
    return [f"codes_{level}" for level in range(self._levels)]

  def _named(self, codes):
    """{name: grid} of a list of grids, top first."""
    return {name: tf.cast(c, tf.int32)
            for name, c in zip(self._code_names(), codes)}

  def _codes(self, images):
    codes = self.vqvae.encode(images)
    return self._named(codes if self._levels > 1 else [codes])

  def _encode_float(self, images):
    return self._codes(self._checked_images(images, "encode_float"))

  def _encode_uint8(self, images, signature="encode"):
    images = self._checked_images(images, signature)
    return self._codes(input_pipeline.scale_images(images))

  def _checked_images(self, images, signature):
    images = _checked(images, [_has_shape(images, self._image_shape,
                                          signature, "images")])
    return tf.ensure_shape(images, [None, *self._image_shape])

  def _decode(self, *codes, signature="decode"):
    checks, checked, batch = [], [], None
    for level, (name, c, shape, k) in enumerate(zip(
        self._code_names(), codes, self._code_shapes, self._sizes)):
      # A finer level's grid must be of the same images as the top one's.
      # The range checks assume the shape: they run after its check.
      c = tf.ensure_shape(_checked(c, [_has_shape(
          c, shape, signature, name, batch=batch,
          batch_of=self._code_names()[0])]), [None, *shape])
      checked.append(c)
      if level == 0:
        batch = tf.shape(c)[0]
      message = f"{signature}: {name} must be in [0, {k})"
      checks += [tf.debugging.assert_non_negative(c, message=message),
                 tf.debugging.assert_less(c, k, message=message)]
    codes = [_checked(c, checks) for c in checked]
    images = self.vqvae.decode(codes if self._levels > 1 else codes[0])
    return {"images": images, "images_uint8": _to_uint8(images)}

  def _decode_named(self, named, signature):
    return self._decode(*[named[name] for name in self._code_names()],
                        signature=signature)

  def _reconstruct(self, images):
    codes = self._encode_uint8(images, "reconstruct")
    return dict(self._decode_named(codes, "reconstruct"), **codes)

  def _sample(self, labels, temperature, seed):
    prior = self.prior
    labels = tf.ensure_shape(_checked(labels, [_has_shape(
        labels, [], "sample", "labels")]), [None])
    scalar = lambda x: tf.equal(tf.size(tf.shape(x)), 0)
    # reshape: the condition stays a scalar whatever shape a caller passes.
    positive = tf.reshape(
        tf.logical_and(tf.math.is_finite(temperature), temperature > 0), [-1])
    checks = [
        tf.debugging.Assert(
            tf.logical_and(scalar(temperature), tf.reduce_all(positive)),
            [tf.strings.format(
                "sample: temperature must be a finite scalar > 0, received "
                "{}", temperature)]),
        tf.debugging.Assert(scalar(seed), [tf.strings.format(
            "sample: seed must be an int64 scalar, received shape {}",
            tf.shape(seed))])]
    if prior.num_classes:
      message = f"sample: labels must be in [0, {prior.num_classes})"
      checks += [
          tf.debugging.assert_non_negative(labels, message=message),
          tf.debugging.assert_less(labels, prior.num_classes,
                                   message=message)]
    # Before any use of them.
    labels = _checked(labels, checks)
    temperature, seed = [tf.ensure_shape(_checked(x, checks), [])
                         for x in (temperature, seed)]
    args = (labels if prior.num_classes else None, temperature,
            tf.stack([seed, 0]))
    if isinstance(prior, hierarchical_prior.HierarchicalPrior):
      codes = prior.sample_graph(tf.shape(labels)[0], self._grid_shapes, *args)
    else:
      codes = [prior.sample_graph(tf.shape(labels)[0], *self._grid_shapes[0],
                                  *args)]
    if self._stages:
      codes = [tf.stack(codes, axis=-1)]
    codes = self._named(codes)
    return dict(self._decode_named(codes, "sample"), **codes)


def _has_shape(tensor: tf.Tensor, shape: Sequence[int], signature: str,
               argument: str, batch: Optional[tf.Tensor] = None,
               batch_of: str = "") -> tf.Operation:
  """An assert that `tensor` is [B, *shape] with B >= 1 (or B == `batch`).

  In the graph, not only in the input signature: a loaded SavedModel's
  signatures do not check their inputs' static shapes, so a 64x64 image
  would otherwise encode to a bigger grid and a 1-channel one fail deep in a
  convolution.
  """
  expected = f"[B, {', '.join(str(n) for n in shape)}]".replace(", ]", "]")
  if batch is None:
    expected += " with B >= 1"
  else:
    expected += f" with B the batch of {batch_of}"
  actual = tf.shape(tensor)
  rank = len(shape) + 1

  def matches():
    ok = tf.reduce_all(tf.equal(actual[1:], tf.constant(shape, tf.int32)))
    if batch is None:
      return tf.logical_and(ok, actual[0] >= 1)
    return tf.logical_and(ok, tf.equal(actual[0], batch))

  ok = tf.cond(tf.equal(tf.size(actual), rank), matches,
               lambda: tf.constant(False))
  return tf.debugging.Assert(ok, [tf.strings.format(
      f"{signature}: {argument} must have shape {expected}, received {{}}",
      actual)])


def _checked(tensor: tf.Tensor, checks: Sequence[tf.Operation]) -> tf.Tensor:
  """`tensor`, computed only after `checks` passed."""
  with tf.control_dependencies(checks):
    return tf.identity(tensor)


def _check_output(output: str) -> None:
  if tf.io.gfile.exists(output) and (not tf.io.gfile.isdir(output) or
                                     tf.io.gfile.listdir(output)):
    raise FileExistsError(
        f"--output {output!r} exists and is not an empty directory; choose a "
        "new path (nothing was written).")


def export_saved_model(workdir: str, output: str,
                       vqvae_workdir: Optional[str] = None) -> str:
  """Writes the newest checkpoint of `workdir` as a SavedModel at `output`.

  Args:
    workdir: a VQ-VAE run's workdir, or a prior's (its VQ-VAE is exported
      with it, plus the `sample` signature).
    output: a path that does not exist yet, or an empty directory. The model
      is written beside it and renamed into place, so a failed export leaves
      nothing there.
    vqvae_workdir: for a prior, its VQ-VAE's workdir; None takes the one its
      run.json records.

  Returns:
    `output`.

  Raises:
    FileExistsError: `output` exists and is not empty.
    FileNotFoundError: `workdir` holds no run or no checkpoint.
    rundir.RunDirError: its checkpoint cannot be restored.
    rundir.FingerprintMismatch: a prior's VQ-VAE workdir holds another
      VQ-VAE.
  """
  from sonnet_vqvae import prior as prior_lib  # pylint: disable=g-import-not-at-top
  _check_output(output)
  stored = loop.read_run(workdir)
  if stored is None:
    raise FileNotFoundError(
        f"No trained run in {workdir!r}: no {loop.RUN_FILE} (a VQ-VAE or "
        "prior workdir has one once it has saved its first checkpoint).")
  prior = None
  if "vqvae" in stored["fingerprint"]:  # A prior's run.
    vqvae_workdir = vqvae_workdir or stored.get("vqvae_workdir")
    if not vqvae_workdir:
      raise ValueError(f"The prior in {workdir!r} records no VQ-VAE workdir; "
                       "pass --vqvae_workdir.")
    _, vqvae = prior_lib.restore_vqvae_of_prior(workdir, vqvae_workdir)
    _, prior = prior_lib.restore_prior(workdir)
    image_shape = loop.read_run(vqvae_workdir)["fingerprint"]["image_shape"]
  else:
    _, vqvae = train.restore_model(workdir)
    image_shape = stored["fingerprint"]["image_shape"]
  module = Exported(vqvae, image_shape, prior)
  write(module, output)
  logging.info("Exported %s to %s (signatures %s).", workdir, output,
               module.signature_names())
  return output


def write(module: Exported, output: str) -> None:
  """Saves `module` with its signatures at `output`, whole or not at all.

  Raises:
    FileExistsError: `output` exists and is not an empty directory.
  """
  _check_output(output)
  output = output.rstrip("/")
  _remove_debris(output)
  staging = f"{output}.export-{os.getpid()}"
  try:
    tf.saved_model.save(module, staging, signatures=module.signatures())
    os.rename(staging, output)  # Replaces an empty directory (POSIX).
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)


def _remove_debris(output: str) -> None:
  """Removes the staging folders killed exports of `output` left beside it.

  `write` stages into OUTPUT.export-<pid>; a kill -9 leaves it behind. One
  whose process is gone is removed; one of a live process (an export
  running now) is left alone.
  """
  for path in glob.glob(glob.escape(output) + ".export-*"):
    pid = path.rsplit("-", 1)[1]
    if not pid.isdigit() or _is_running(int(pid)):
      continue
    logging.warning("Removing %s, left by an export that was killed.", path)
    shutil.rmtree(path, ignore_errors=True)


def _is_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # Signal 0 only checks that the process exists.
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Another user's.
  return True


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  export_saved_model(flags.FLAGS.workdir, flags.FLAGS.output,
                     flags.FLAGS.vqvae_workdir)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A VQ-VAE or prior workdir.",
                      required=True)
  flags.DEFINE_string("output", None, "Where to write the SavedModel (a new "
                      "path or an empty directory).", required=True)
  flags.DEFINE_string("vqvae_workdir", None, "For a prior: its VQ-VAE's "
                      "workdir (default: the one its run.json records).")
  cli.run(main)
