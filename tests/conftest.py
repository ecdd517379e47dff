"""Session-wide test setup."""

import tensorflow as tf

# Replica tests need 2+ devices on CPU-only machines. Logical devices can only be
# configured before TF initialises its runtime, so it happens here, at collection.
_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * 2)
