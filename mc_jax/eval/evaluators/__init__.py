"""eval/evaluators"""
