"""Attribution of a target to MLP neurons: integrated gradients and its quadrature rules."""

from .grids import GRIDS, Grid, quadrature
from .ig import Engine, attribute, integrated_gradients
from .result import Attribution, AttributionSettings

__all__ = ["Attribution", "AttributionSettings", "Engine", "GRIDS", "Grid", "attribute", "integrated_gradients",
           "quadrature"]
