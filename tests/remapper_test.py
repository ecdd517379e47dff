"""No "remapper failed" line: grappler fuses our residual stacks.

With oneDNN (the default on x86), grappler's remapper fused conv + bias +
sum + relu and deleted a residual sum that another op still read; its whole
pass failed with `E0000 ... meta_optimizer.cc] remapper failed:
INVALID_ARGUMENT: Mutation::Apply error ...` on stderr (C++ logging, on file
descriptor 2, hence `capfd`) and nothing in the function was fused.
"""

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from sonnet_vqvae import hierarchical
from sonnet_vqvae import networks

_REMAPPER = "remapper failed"


def _plain_stack(stack, inputs):
  """ResidualStack's maths written plainly (what the notebook's model does)."""
  h = inputs
  for conv3, conv1 in stack._layers:  # pylint: disable=protected-access
    h += conv1(tf.nn.relu(conv3(tf.nn.relu(h))))
  return tf.nn.relu(h)


def _outputs_and_gradients(stack, call, inputs):
  @tf.function
  def run(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = call(x)
      loss = tf.reduce_sum(y * y)
    return [y] + tape.gradient(loss, [x] + list(stack.trainable_variables))
  return [t.numpy() for t in run(inputs)]


def test_stacks_under_tf_function_print_no_remapper_error(capfd):
  x = tf.random.stateless_normal([2, 8, 8, 8], [0, 1])
  stack = networks.ResidualStack(8, 2, 4)
  stack(x)
  # With gradients (a train step), and forward only a stack whose output is
  # relu'd again (VQ-VAE-2's level decoder: grappler then reads a sum twice).
  ours = _outputs_and_gradients(stack, stack, x)
  decoder = hierarchical.LevelDecoder(8, 1, 4, output_channels=3)
  tf.function(decoder)(x).numpy()
  assert _REMAPPER not in capfd.readouterr().err

  # The node that avoids it changes no bit of the outputs or gradients.
  plain = _outputs_and_gradients(stack, lambda h: _plain_stack(stack, h), x)
  for a, b in zip(ours, plain):
    np.testing.assert_array_equal(a, b)


# A tiny training, its export, and calls of the loaded export, in a fresh
# process as a user runs them.
_TRAIN_EXPORT_LOAD = textwrap.dedent("""
    import sys
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from sonnet_vqvae import export, train
    import tiny

    workdir, output = sys.argv[1:]
    with tfds.testing.mock_data(num_examples=16):
      train.train(tiny.vqvae_config(num_steps=2, log_every=1,
                                    checkpoint_every=2, jit_compile=False),
                  workdir)
    export.export_saved_model(workdir, output)
    signatures = tf.saved_model.load(output).signatures
    signatures["reconstruct"](images=tf.zeros([2, 32, 32, 3], tf.uint8))
    print("done")
""")


@pytest.mark.slow
def test_training_and_an_exports_calls_print_no_remapper_error():
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
  with tempfile.TemporaryDirectory() as base:
    run = subprocess.run(
        [sys.executable, "-c", _TRAIN_EXPORT_LOAD,
         os.path.join(base, "run"), os.path.join(base, "export")],
        env=env, capture_output=True, text=True, check=False)
  assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr
  assert _REMAPPER not in run.stderr, run.stderr
