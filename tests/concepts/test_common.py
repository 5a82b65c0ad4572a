"""Tests for jaxcnmf.concepts._common: input checks shared by the concept analyses, and every module's doctest."""

import doctest

import numpy as np
import pytest

from jaxcnmf.concepts import fidelity, images, labels, neighbours, neurons


MODULES = (labels, neurons, images, neighbours, fidelity)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: labels.class_shares(np.ones(3), [0, 1, 2], 3), "F: expected a 2-D array"),
        (lambda: labels.class_shares(-np.ones((2, 3)), [0, 1, 2], 3), "F: expected non-neg"),
        (lambda: labels.class_shares(np.ones((2, 3)), [0, 1], 3), r"labels: expected shape \(3,\)"),
        (lambda: labels.class_shares(np.ones((2, 3)), [0, 1, 5], 3), "labels: expected labels < num"),
        (lambda: labels.top_images(np.ones((2, 3)), 4), "k: expected at most 3"),
        (lambda: labels.nmi(np.zeros(3), np.zeros(4)), "a, b: expected two 1-D labelings"),
        (lambda: neurons.loading_similarity(np.array([[np.nan]])), "O: expected finite values"),
        (lambda: images.masked_images(np.zeros((1, 2, 2, 1)), np.ones((2, 2))), "images: expected"),
        (lambda: neighbours.accuracy_vs_entropy([0.0, 1.0], [True], 2), r"correct: expected shape"),
    ],
)
def test_error_messages_name_the_parameter(call, message):
    with pytest.raises(ValueError, match=message):
        call()
