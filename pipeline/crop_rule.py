"""The version of the crop rule, on its own so that naming a feature store does not import the crop step.

:class:`pipeline.backbones.base.FeatureSpec` records it (hence every store name),
and a no-op ``uld features`` builds a FeatureSpec: importing
:mod:`pipeline.datasets.crop` for one integer would import the dataset package
(pandas, PIL), about a second on a busy 2-core machine. The crop step itself
re-exports it as ``pipeline.datasets.crop.CROP_RULE``.
"""

#: Version of the rule that turns (image, crop box, size) into crop pixels; it is
#: part of every FeatureSpec (hence of feature-store names), so stores made with
#: an older rule are never reused. 1 = edge replication, 2 = mean-colour fill.
CROP_RULE = 2
