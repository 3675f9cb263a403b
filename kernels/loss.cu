// Preference losses on the device (src/genius/loss.rs is the definition, in f64): per pair,
// the policy's log-prob sums over its chosen and rejected rows, then the loss (ACO with either
// clip, DPO, SimPO, IPO, SFT), its gradients with respect to the two sums and the monitoring
// values. One block per pair; launch shapes from src/backend/cuda/loss.rs.
#include "common.cuh"

#define GE_LOSS_THREADS 256

__device__ __forceinline__ double ge_softplus(double x) {
    return fmax(x, 0.0) + log1p(exp(-fabs(x)));
}

__device__ __forceinline__ double ge_sigmoid(double x) {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    const double e = exp(x);
    return e / (1.0 + e);
}

// Sum of rows [begin, end) of `lp` in f64, block-wide: per-thread strided sums, then a fixed
// tree (the same order on every run).
__device__ double ge_segment_sum(const float* lp, unsigned begin, unsigned end, double* s) {
    double acc = 0.0;
    for (unsigned i = begin + threadIdx.x; i < end; i += blockDim.x) {
        acc += (double)lp[i];
    }
    s[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned step = blockDim.x / 2; step > 0; step /= 2) {
        if (threadIdx.x < step) {
            s[threadIdx.x] += s[threadIdx.x + step];
        }
        __syncthreads();
    }
    const double total = s[0];
    __syncthreads();
    return total;
}

extern "C" __global__ void ge_pair_losses(PairLossArgs a) {
    __shared__ double s[GE_LOSS_THREADS];
    const int p = blockIdx.x;
    if (p >= a.pairs) {
        return;
    }
    const float* lp = reinterpret_cast<const float*>(a.row_logprobs);
    const unsigned* seg = reinterpret_cast<const unsigned*>(a.segments) + 4 * p;
    const double* in = reinterpret_cast<const double*>(a.inputs) + 6 * p;
    double* out = reinterpret_cast<double*>(a.outputs) + GE_PAIR_LOSS_OUTPUTS * p;
    const double pc = ge_segment_sum(lp, seg[0], seg[1], s);
    const double pr = ge_segment_sum(lp, seg[2], seg[3], s);
    if (threadIdx.x != 0) {
        return;
    }
    const double ref_c = in[0], ref_r = in[1], n_w = in[2], n_l = in[3];
    const double adv_c = in[4], adv_r = in[5];
    const double beta = a.beta;
    const double r_w = pc - ref_c;
    const double r_l = pr - ref_r;
    double loss, gc, gr, cr, rr, w = 1.0;
    if (a.kind == GE_LOSS_ACO || a.kind == GE_LOSS_DPO) {
        if (a.kind == GE_LOSS_ACO) {
            const double e = exp(-(adv_r - adv_c) / a.alpha);
            w = a.clip_max ? fmax(e, 1.0) : fmin(e, 1.0);
        }
        cr = beta * r_w;
        rr = beta * r_l;
        const double z = cr - beta * w * r_l;
        const double sg = ge_sigmoid(-z);
        loss = ge_softplus(-z);
        gc = -beta * sg;
        gr = beta * w * sg;
    } else if (a.kind == GE_LOSS_SIMPO) {
        cr = beta * (pc / n_w);
        rr = beta * (pr / n_l);
        const double z = cr - rr - a.gamma;
        const double sg = ge_sigmoid(-z);
        loss = ge_softplus(-z);
        gc = -beta * sg / n_w;
        gr = beta * sg / n_l;
    } else if (a.kind == GE_LOSS_IPO) {
        const double d = r_w - r_l - 1.0 / (2.0 * a.tau);
        loss = d * d;
        gc = 2.0 * d;
        gr = -2.0 * d;
        cr = beta * r_w;
        rr = beta * r_l;
    } else {  // SFT
        loss = -pc / n_w;
        gc = -1.0 / n_w;
        gr = 0.0;
        cr = beta * r_w;
        rr = beta * r_l;
    }
    out[0] = pc;
    out[1] = pr;
    out[2] = loss;
    out[3] = gc;
    out[4] = gr;
    out[5] = cr;
    out[6] = rr;
    out[7] = w;
    out[8] = cr - rr;
}
