"""What a ModelPack artifact describes, as pure logic: manifest layers to a file tree, tar headers
to members, bounded decompression. No I/O of its own; the fetcher, the filesystem and the node
service all build on it, and it imports none of them."""
