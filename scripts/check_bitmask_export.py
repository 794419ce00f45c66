import sys, json, torch
from safetensors.torch import load_file
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import CompressionFormat
bm, dense = sys.argv[1], sys.argv[2]
cfg = json.load(open(bm + "/config.json"))
mc = ModelCompressor.from_compression_config(cfg["quantization_config"])
print("sparsity compressor:", type(mc.sparsity_compressor).__name__)
ref = load_file(dense + "/model.safetensors")
out = dict(mc.sparsity_compressor.decompress(bm + "/model.safetensors"))
n = 0
for k, v in out.items():
    assert torch.equal(v, ref[k]), k
    n += 1
print("decompressed", n, "weights, all equal")
