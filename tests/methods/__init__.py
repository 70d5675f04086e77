"""The shared test battery over every registered method."""
