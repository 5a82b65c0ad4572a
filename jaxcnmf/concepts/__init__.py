"""What the factors mean: analyses of a fit, on plain NumPy arrays.

- :mod:`jaxcnmf.concepts.labels`: class and superclass shares, top images, purity, NMI,
  the k-means baseline (paper 4.1.1).
- :mod:`jaxcnmf.concepts.neurons`: cosine similarity of loading columns per layer and its
  spectrum (4.1.2).
- :mod:`jaxcnmf.concepts.images`: latent images from the pixel loadings, median masks,
  masked top images (4.1.3).
- :mod:`jaxcnmf.concepts.neighbours`: nearest neighbours in F-space, their concept mix,
  accuracy against neighbour entropy.
- :mod:`jaxcnmf.concepts.fidelity`: accuracy with a layer replaced by ``O_j F``.
- :mod:`jaxcnmf.concepts.tcav`: CAVs, TCAV scores and their statistics (Section 5).

``jaxcnmf.analysis`` is the former flat module: it still holds every name of the first
five, so existing code keeps working.
"""
