// The emulation self-test kernels' argument (tools/kernel-emu/selftest.cu).
#pragma once
struct SelfTestArgs {
    const unsigned int* in;
    unsigned int* out;
};
