"""Soup recipes, one file each, each readable next to its paper."""
