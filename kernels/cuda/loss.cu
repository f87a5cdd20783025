// Softmax cross-entropy of logits[rows, vocab] with i32 labels and an
// ignore index, forward and gradient in one pass over each row, or the
// loss alone or the gradient alone (f32 or bf16 logits each), as the CPU
// reference (kernels/src/loss.rs, loss_and_grad_in_place): f32 math, the
// gradient c*(softmax - onehot) in the logits' type (rounded for bf16),
// zeros and a zero loss on ignored rows. The host has checked every counted
// label against vocab.

// One block per row; the vocabulary is walked in strides of blockDim.x, so
// any vocab works. row_loss[r] = lse - x[label] (0 when ignored; skipped
// when row_loss is null); with dlogits, also the gradient c*(softmax -
// onehot) in dlogits' type (bf16 rounded to nearest even).
template <typename T, typename TD>
__device__ void cross_entropy_row(const T* logits, const int* labels, TD* dlogits, float* row_loss, int vocab,
                                  int ignore, float c) {
    size_t off = (size_t)blockIdx.x * vocab;
    const T* x = logits + off;
    TD* d = dlogits ? dlogits + off : nullptr;
    int label = labels[blockIdx.x];
    // The same for the whole block, so returning here skips no barrier for
    // only part of it. Out-of-range labels were refused by the host; the
    // second test only keeps a bad one from reading out of bounds.
    if (label == ignore || label < 0 || label >= vocab) {
        if (d)
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) st(d, j, 0.0f);
        if (row_loss && threadIdx.x == 0) row_loss[blockIdx.x] = 0.0f;
        return;
    }
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, ld(x, j));
    m = block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(ld(x, j) - m);
    float lse = m + logf(block_sum(s));
    if (d)
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float p = expf(ld(x, j) - lse);
            st(d, j, c * (j == label ? p - 1.0f : p));
        }
    if (row_loss && threadIdx.x == 0) row_loss[blockIdx.x] = lse - ld(x, label);
}

extern "C" __global__ void cross_entropy_fwd_bwd(const bf16_t* logits, const int* labels,
                                                 bf16_t* dlogits, float* row_loss, int vocab,
                                                 int ignore, float c) {
    cross_entropy_row(logits, labels, dlogits, row_loss, vocab, ignore, c);
}
extern "C" __global__ void cross_entropy_fwd_bwd_f32(const float* logits, const int* labels,
                                                     float* dlogits, float* row_loss, int vocab,
                                                     int ignore, float c) {
    cross_entropy_row(logits, labels, dlogits, row_loss, vocab, ignore, c);
}

// The gradient alone (the unfused cross-entropy's backward, as f32 steps
// record it): c = dloss / counted with dloss read on the device, in the
// logits' type.
extern "C" __global__ void cross_entropy_grad_f32(const float* logits, const int* labels, float* dlogits,
                                                  int vocab, int ignore, const float* dloss, float counted) {
    cross_entropy_row(logits, labels, dlogits, (float*)nullptr, vocab, ignore, dloss[0] / counted);
}
extern "C" __global__ void cross_entropy_grad_bf16(const bf16_t* logits, const int* labels, bf16_t* dlogits,
                                                   int vocab, int ignore, const float* dloss, float counted) {
    cross_entropy_row(logits, labels, dlogits, (float*)nullptr, vocab, ignore, dloss[0] / counted);
}

// The loss alone (an eval plan's), of f32 or bf16 logits.
extern "C" __global__ void cross_entropy_rows_f32(const float* logits, const int* labels, float* row_loss,
                                                  int vocab, int ignore) {
    cross_entropy_row(logits, labels, (bf16_t*)nullptr, row_loss, vocab, ignore, 0.0f);
}
extern "C" __global__ void cross_entropy_rows_bf16(const bf16_t* logits, const int* labels, float* row_loss,
                                                   int vocab, int ignore) {
    cross_entropy_row(logits, labels, (bf16_t*)nullptr, row_loss, vocab, ignore, 0.0f);
}

// One block: loss[0] = (sum of row_loss in f64) / counted, rounded to f32
// (0/0 = NaN when nothing is counted, as the CPU and PyTorch).
extern "C" __global__ void mean_loss(const float* row_loss, int rows, double counted, float* loss) {
    double s = 0.0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) s += (double)row_loss[i];
    s = block_sum(s);
    if (threadIdx.x == 0) loss[0] = (float)(s / counted);
}
