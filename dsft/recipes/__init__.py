"""Recipes: YAML-defined stages, validated up front, run by one small runner (resumable from checkpoints).

    recipe = load_recipe("two-stage", ["stages.1.lr=2e-5"])   # validated frozen dataclass tree
    rows = compare_recipes(domain="finance", max_steps=30)      # every built-in recipe, measured
"""
from dsft.recipes.compare import compare_recipes
from dsft.recipes.schema import Recipe, Stage, builtin_recipes, load_recipe

__all__ = ["Recipe", "Stage", "builtin_recipes", "compare_recipes", "load_recipe"]
