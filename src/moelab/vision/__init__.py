"""The DeepSeek-VL2 path (docs/methods.md §12): dynamic tiling and the image-token layout today."""
