"""Ray actors for distributed compression. Not built yet: see the issue "Distributed compression on Ray"."""
