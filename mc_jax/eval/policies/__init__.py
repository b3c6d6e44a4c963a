"""eval/policies"""
