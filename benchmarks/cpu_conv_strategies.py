import torch, time, torch.nn.functional as F
torch.set_num_threads(2)
def bench(f, n=5):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
for (N,K,C,H) in [(32,2,32,32),(32,4,32,32),(32,4,64,16),(8,2,64,32),(128,2,48,32)]:
  for cl in (False, True):
    x=torch.randn(N,K*C,H,H,requires_grad=True); w=torch.randn(K*C,C,3,3,requires_grad=True)
    if cl: x=x.detach().to(memory_format=torch.channels_last).requires_grad_()
    def g(): return F.conv2d(x,w,None,1,1,1,K)
    def l(): return torch.cat([F.conv2d(x[:,k*C:(k+1)*C], w[k*C:(k+1)*C],None,1,1) for k in range(K)],1)
    def gb(): g().sum().backward()
    def lb(): l().sum().backward()
    with torch.no_grad(): a,b=bench(g),bench(l)
    c,d=bench(gb),bench(lb)
    print(f"N{N} K{K} C{C} H{H} cl={cl}: fwd grouped {a:.1f} loop {b:.1f} | fwdbwd grouped {c:.1f} loop {d:.1f}")
