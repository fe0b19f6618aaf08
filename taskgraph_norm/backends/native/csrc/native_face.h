/* What native_face.c (the checks both C faces make before their plan, and their
 * output) gives native_face_calls.c (LayerNorm's and RMSNorm's calls). */
#ifndef TGN_NATIVE_FACE_H
#define TGN_NATIVE_FACE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "tgn_native.h"

enum { TGN_FACE_MAX_DIMS = 8 };

/* A plain tensor's metadata: a CPU, contiguous tensor of fp32 (code TGN_DTYPE_F32),
 * bf16 or fp16 with at most TGN_FACE_MAX_DIMS dims. */
typedef struct {
    char *data;
    int64_t code, ndim, numel, dims[TGN_FACE_MAX_DIMS];
} tgn_view_t;

/* What face_setup hands over once (new references). */
typedef struct {
    PyObject *tensor, *parameter, *empty_like, *to_dlpack, *dispatch_len, *tracing_state, *functorch_active,
        *grad_enabled, *forward_ad, *allowed, *triton_asked, *default_eps, *dtypes[3], *threads;
    PyObject *native, *requires_grad, *level, *data_ptr, *face;
    double layer_eps;
    int ready;
} tgn_face_state_t;
extern tgn_face_state_t tgn_face;

/* t's view (1), or 0 (not such a tensor; the error, if any, cleared). */
int tgn_face_view(PyObject *t, tgn_view_t *v);
/* A fresh tensor like x (torch.empty_like) and its address, or NULL (error cleared). */
PyObject *tgn_face_fresh(PyObject *x, void **at);
/* What both faces check before their plan (native_face.c says what). */
int tgn_face_of(PyObject *by_config, PyObject *x, PyObject *w, PyObject *b, PyObject *eps, PyObject *const *options,
                int n, int64_t limit, tgn_view_t *xv, PyObject **pipe, PyObject **face);
/* The call's output (native_face.c says which). */
PyObject *tgn_face_output(PyObject *out, PyObject *x, const tgn_view_t *xv, int64_t bytes, const tgn_view_t *wv,
                          int64_t w_bytes, void **at, int64_t *mapped);

#endif /* TGN_NATIVE_FACE_H */
