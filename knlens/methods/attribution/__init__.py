"""Attribution of a target to MLP neurons: integrated gradients, AMIG and their quadrature rules."""

from knlens.methods.attribution.amig import attribute_amig, attribute_amig_facts
from knlens.methods.attribution.grids import GRIDS, Grid, quadrature
from knlens.methods.attribution.ig import attribute, integrated_gradients
from knlens.methods.attribution.result import Attribution, AttributionSettings

__all__ = ["Attribution", "AttributionSettings", "GRIDS", "Grid", "attribute", "attribute_amig",
           "attribute_amig_facts", "integrated_gradients", "quadrature"]
