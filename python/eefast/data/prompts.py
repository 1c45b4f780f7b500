"""Built-in chat prompts for the demo, calibration and the generation benchmark (disjoint from
the self-distilled training prompts of chat.py)."""

# Chat prompts on mixed topics for calibration and benchmarks.
PROMPTS = [
    "Explain what a Python list comprehension is, with an example.",
    "Write a short poem about the sea at night.",
    "What are three tips for staying focused while studying?",
    "Summarise the causes of the French Revolution in a few sentences.",
    "How do I reverse a string in JavaScript?",
    "Describe how photosynthesis works to a ten-year-old.",
    "Give me a simple recipe for pancakes.",
    "What is the difference between a virus and a bacterium?",
]
