"""The reference GRPO loop's pieces (issue 6): so far the embedded task."""
