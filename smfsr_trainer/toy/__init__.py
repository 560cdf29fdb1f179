"""A low-dimensional conditional problem where the answer is known, to check that the method works."""
