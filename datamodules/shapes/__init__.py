"""The synthetic shapes world, the embedded default dataset: exact scenes, so exact answerability.

`world` samples and renders scenes of moving coloured shapes; `questions` asks answerable and unanswerable
(object, relation, attribute) questions about a scene and phrases them; `dataset` builds the clips and the
train/val/test record files; `frames` serves labelled frames for pretraining the tiny model's vision tower.
Nothing outside this package (and the tiny model) depends on it.
"""
