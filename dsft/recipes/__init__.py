"""Recipes: YAML-defined stages, validated up front, run by one small runner."""
from dsft.recipes.schema import Recipe, Stage, builtin_recipes, load_recipe

__all__ = ["Recipe", "Stage", "builtin_recipes", "load_recipe"]
