"""The bottom layer: numbers only. Integer grids and the quantized-weight type solvers hand to writers
(grid), bit packing of codes into words (pack), and llama.cpp's GGML block codecs (ggml). Nothing here
knows about models, files or runs; every other package may import it, and it imports none of them."""
