"""fap: Fast AdvProp training toolkit (Mei et al., ICLR 2022) on timm + Accelerate."""
__version__ = "0.1.0"
