"""The sub-1-bit ternary codec. Not built yet: see the codec issue; experts are stored 2 bits/weight meanwhile."""
