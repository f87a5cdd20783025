// Softmax cross-entropy of bf16 logits[rows, vocab] with i32 labels and an
// ignore index, forward and gradient in one pass over each row, as the CPU
// reference (kernels/src/loss.rs, loss_and_grad_in_place): f32 math, the
// gradient c*(softmax - onehot) rounded to bf16, zeros and a zero loss on
// ignored rows. The host has checked every counted label against vocab.

// One block per row; the vocabulary is walked in strides of blockDim.x, so
// any vocab works. row_loss[r] = lse - x[label] (0 when ignored).
extern "C" __global__ void cross_entropy_fwd_bwd(const bf16_t* logits, const int* labels,
                                                 bf16_t* dlogits, float* row_loss, int vocab,
                                                 int ignore, float c) {
    size_t off = (size_t)blockIdx.x * vocab;
    const bf16_t* x = logits + off;
    bf16_t* d = dlogits + off;
    int label = labels[blockIdx.x];
    // The same for the whole block, so returning here skips no barrier for
    // only part of it. Out-of-range labels were refused by the host; the
    // second test only keeps a bad one from reading out of bounds.
    if (label == ignore || label < 0 || label >= vocab) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) d[j] = 0;
        if (threadIdx.x == 0) row_loss[blockIdx.x] = 0.0f;
        return;
    }
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, bf16_to_f32(x[j]));
    m = block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(bf16_to_f32(x[j]) - m);
    float lse = m + logf(block_sum(s));
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float p = expf(bf16_to_f32(x[j]) - lse);
        d[j] = f32_to_bf16(c * (j == label ? p - 1.0f : p));
    }
    if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - bf16_to_f32(x[label]);
}

// One block: loss[0] = (sum of row_loss in f64) / counted, rounded to f32
// (0/0 = NaN when nothing is counted, as the CPU and PyTorch).
extern "C" __global__ void mean_loss(const float* row_loss, int rows, double counted, float* loss) {
    double s = 0.0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) s += (double)row_loss[i];
    s = block_sum(s);
    if (threadIdx.x == 0) loss[0] = (float)(s / counted);
}
