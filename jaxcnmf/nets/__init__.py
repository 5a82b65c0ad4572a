"""What is probed: the data, the networks, their training, and running them.

- :mod:`jaxcnmf.nets.data`: datasets (CIFAR-10/100, tensorflow-datasets, image folders,
  ``.npz``, the bundled digits) as one ``Dataset`` type.
- :mod:`jaxcnmf.nets.models`: the Flax models (ResNet-18, VGG-11-BN, a small CNN).
- :mod:`jaxcnmf.nets.train`: optax training with atomic, resumable checkpoints.
- :mod:`jaxcnmf.nets.probe`: the one module that runs a network: activations of named
  layers (``collect``), gradients with respect to a layer, interventions that replace a
  layer's output, and layer shapes.
- :mod:`jaxcnmf.nets.adapters`: how a network is run and its layers named, for Flax Linen
  modules, Flax NNX modules and plain functions (``from_function``).
- :mod:`jaxcnmf.nets.usermodel`: the user's own network: a builder imported by
  ``module:name``, and its orbax checkpoint saved and restored.
"""
