"""Stage two: progressive unfreezing under a Nevergrad search, with Grad-CAM."""
