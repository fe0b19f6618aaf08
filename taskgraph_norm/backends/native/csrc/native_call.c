/* The direct path's call from Python without ctypes (direct.py): a METH_FASTCALL
 * function `rows` of a tiny extension module in the same library, taking the same
 * ten arguments as tgn_rows_call (native_team.c), which it calls with the GIL
 * released.  ctypes spends about 0.1 us converting each argument (about 1 us for
 * these ten); this call spends about 0.13 us in all.  Where Python's headers are
 * missing the module is left out, and loader.py calls tgn_rows_call through ctypes,
 * with the same arguments (tests/test_native_team.py runs both).
 *
 * rows(cfg, x, y, rows, w, eps, total, r, h, threads) -> int
 *   cfg: the address of a tgn_rows_cfg_t (abi.py's RowsConfig, kept alive by the
 *   caller); x, y, w, total, r, h: addresses or None; rows, threads: ints; eps: float.
 *   Returns tgn_rows_call's result (rows left to the general path; -1: no scratch).
 */
#if defined(TGN_MODULE) && defined(__has_include)
#if __has_include(<Python.h>)
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "tgn_native.h"

/* An address, or NULL for None; sets a Python error on anything else. */
static void *address(PyObject *o)
{
    return o == Py_None ? NULL : PyLong_AsVoidPtr(o);
}

static PyObject *rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "rows() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    const struct tgn_rows_cfg *cfg = address(args[0]);
    const float *x = address(args[1]);
    float *y = address(args[2]);
    int64_t n = PyLong_AsLongLong(args[3]);
    const float *w = address(args[4]);
    double eps = PyFloat_AsDouble(args[5]);
    void *total = address(args[6]);
    const float *r = address(args[7]);
    float *h = address(args[8]);
    int64_t threads = PyLong_AsLongLong(args[9]);
    if (PyErr_Occurred())
        return NULL;
    if (!cfg || n < 0 || (!x && n > 0)) {
        PyErr_SetString(PyExc_ValueError, "rows(): cfg and x must be addresses and rows >= 0");
        return NULL;
    }
    if (n == 0)
        return PyLong_FromLong(0); /* an empty input: nothing to read or write */
    int64_t result;
    Py_BEGIN_ALLOW_THREADS
    result = tgn_rows_call(cfg, x, y, n, w, eps, total, r, h, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(result);
}

static PyMethodDef methods[] = {
    {"rows", (PyCFunction)(void (*)(void))rows, METH_FASTCALL, "tgn_rows_call, with the GIL released"},
    {NULL, NULL, 0, NULL},
};

#define TGN_CAT2(a, b) a##b
#define TGN_CAT(a, b) TGN_CAT2(a, b)
#define TGN_STR2(a) #a
#define TGN_STR(a) TGN_STR2(a)

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, TGN_STR(TGN_MODULE), NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC TGN_CAT(PyInit_, TGN_MODULE)(void) { return PyModule_Create(&module); }
#endif
#endif

typedef int tgn_native_call_unit; /* ISO C: never an empty file */
