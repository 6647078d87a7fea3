/* cblas_sgemm for MLX on Linux CPUs, forwarding to scipy-openblas.
 *
 * MLX's CPU wheel links a slow reference BLAS; loading this library with RTLD_GLOBAL before
 * mlx.core makes MLX's float32 matmuls resolve here. Matrix-vector products (decoding: M=1)
 * go to sgemv, which streams the weights at close to memory bandwidth, where sgemm does not.
 */
#include <string.h>

enum { RowMajor = 101, ColMajor = 102 };
enum { NoTrans = 111, Trans = 112 };

void scipy_cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                       const float *a, int lda, const float *b, int ldb, float beta,
                       float *c, int ldc);
void scipy_cblas_sgemv(int order, int trans, int m, int n, float alpha, const float *a,
                       int lda, const float *x, int incx, float beta, float *y, int incy);

static void zero_strided(float *y, int n, int inc) {
  if (inc == 1) { memset(y, 0, (size_t)n * sizeof(float)); return; }
  for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc) {
  if (order == ColMajor) {
    /* C = op(A) op(B) in column-major is C^T = op(B)^T op(A)^T in row-major. */
    const float *t = a; a = b; b = t;
    int ti = lda; lda = ldb; ldb = ti;
    ti = ta; ta = tb; tb = ti;
    ti = m; m = n; n = ti;
  }
  if (k > 0 && (m == 1 || n == 1)) {
    if (beta == 0.0f) {
      if (m == 1) zero_strided(c, n, 1); else zero_strided(c, m, ldc);
      beta = 0.0f;
    }
    if (m == 1) {
      /* c[1,n] = a[1,k] op(b)[k,n]: y = op(b)^T x */
      int incx = ta == NoTrans ? 1 : lda;
      if (tb == Trans) scipy_cblas_sgemv(RowMajor, NoTrans, n, k, alpha, b, ldb, a, incx, beta, c, 1);
      else scipy_cblas_sgemv(RowMajor, Trans, k, n, alpha, b, ldb, a, incx, beta, c, 1);
    } else {
      /* c[m,1] = op(a)[m,k] b[k,1]: y = op(a) x */
      int incx = tb == NoTrans ? ldb : 1;
      if (ta == NoTrans) scipy_cblas_sgemv(RowMajor, NoTrans, m, k, alpha, a, lda, b, incx, beta, c, ldc);
      else scipy_cblas_sgemv(RowMajor, Trans, k, m, alpha, a, lda, b, incx, beta, c, ldc);
    }
    return;
  }
  scipy_cblas_sgemm(RowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
