//! Kiln workspace root.
