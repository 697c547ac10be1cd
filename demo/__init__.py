"""``python -m cxr_counterfactual demo`` (:mod:`.run`) and the tiny random-weight checkpoint it, the tests and the
``tiny-checkpoint`` command build (:mod:`.tiny_checkpoint`)."""
