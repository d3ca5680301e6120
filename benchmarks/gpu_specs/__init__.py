"""Compile specs (`COMPILE_SPECS`) and H100 work models (`WORK_MODELS`) of each Triton kernel
module, one module a kernel module, read by `benchmarks.gpu_report`."""
