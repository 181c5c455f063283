"""MiniExpert: a small multi-domain expert library built on the CPU in minutes (``etr miniexpert build``)."""
