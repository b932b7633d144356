"""Attribution of a target to MLP neurons: integrated gradients and its quadrature rules."""

from knlens.methods.attribution.grids import GRIDS, Grid, quadrature
from knlens.methods.attribution.ig import attribute, integrated_gradients
from knlens.methods.attribution.result import Attribution, AttributionSettings

__all__ = ["Attribution", "AttributionSettings", "GRIDS", "Grid", "attribute", "integrated_gradients",
           "quadrature"]
