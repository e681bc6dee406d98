package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	psa "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// overlays are deploy/overlays/*, each with the Secrets it expects the
// platform to have made (the Deployment names them, the overlay does not).
// Only dev holds the namespace; prod expects it made (deploy/namespace).
var overlays = map[string][]string{"dev": nil, "prod": {"items-secrets"}}

// manifestTypes are the kinds deploy/ may hold, by apiVersion/kind: any
// other fails TestManifests, so that each object is decoded into its type.
var manifestTypes = map[string]func() any{
	"v1/Namespace":                           func() any { return new(corev1.Namespace) },
	"v1/ConfigMap":                           func() any { return new(corev1.ConfigMap) },
	"v1/Secret":                              func() any { return new(corev1.Secret) },
	"v1/Service":                             func() any { return new(corev1.Service) },
	"apps/v1/Deployment":                     func() any { return new(appsv1.Deployment) },
	"apps/v1/StatefulSet":                    func() any { return new(appsv1.StatefulSet) },
	"policy/v1/PodDisruptionBudget":          func() any { return new(policyv1.PodDisruptionBudget) },
	"autoscaling/v2/HorizontalPodAutoscaler": func() any { return new(autoscalingv2.HorizontalPodAutoscaler) },
	"networking.k8s.io/v1/NetworkPolicy":     func() any { return new(networkingv1.NetworkPolicy) },
}

// rendered is an overlay as `kubectl kustomize` renders it (with the same
// kustomize, krusty), each object decoded strictly into its k8s.io/api
// type, by kind and name.
type rendered map[string]map[string]any

func render(t *testing.T, dir string) rendered {
	t.Helper()
	resources, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize %s: %v", dir, err)
	}
	objects := rendered{}
	for _, r := range resources.Resources() {
		kind := r.GetApiVersion() + "/" + r.GetKind()
		newObject, ok := manifestTypes[kind]
		if !ok {
			t.Errorf("%s %s: a kind TestManifests does not know", kind, r.GetName())
			continue
		}
		data, err := r.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		// As the API server decodes with strict field validation: a field
		// unknown to the type (misspelt, or misplaced) or given twice, and
		// names that match only in case, are errors.
		obj := newObject()
		strict, err := kjson.UnmarshalStrict(data, obj)
		if err != nil || len(strict) > 0 {
			t.Errorf("%s %s: %v %v", kind, r.GetName(), err, strict)
		}
		if objects[r.GetKind()] == nil {
			objects[r.GetKind()] = map[string]any{}
		}
		objects[r.GetKind()][r.GetName()] = obj
	}
	return objects
}

func get[T any](t *testing.T, objects rendered, kind, name string) T {
	t.Helper()
	obj, ok := objects[kind][name].(T)
	if !ok {
		t.Fatalf("no %s %s rendered", kind, name)
	}
	return obj
}

// TestManifests renders each overlay and checks, without a cluster, what a
// cluster would refuse and what the service needs of it: Pod Security's
// restricted profile (by the admission controller's own checks), names
// that resolve, a configuration the service accepts, and the rollout and
// shutdown rules of docs/kubernetes.md.
func TestManifests(t *testing.T) {
	restricted, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ns := get[*corev1.Namespace](t, render(t, "deploy/namespace"), "Namespace", "items")
	if level := ns.Labels[psa.EnforceLevelLabel]; level != string(psa.LevelRestricted) {
		t.Errorf("namespace items enforces %q, want restricted", level)
	}
	for overlay, external := range overlays {
		t.Run(overlay, func(t *testing.T) {
			objects := render(t, filepath.Join("deploy", "overlays", overlay))
			if _, ok := objects["Namespace"]["items"]; ok != (overlay == "dev") {
				t.Errorf("the overlay holds the namespace: %v; want it in dev alone (kubectl delete -k of prod must leave it, and the platform's Secret)", ok)
			}
			templates := map[string]*corev1.PodTemplateSpec{}
			for kind, byName := range objects {
				for name, obj := range byName {
					if m, ok := obj.(metav1.ObjectMetaAccessor); ok && kind != "Namespace" && m.GetObjectMeta().GetNamespace() != "items" {
						t.Errorf("%s %s is in namespace %q, not items", kind, name, m.GetObjectMeta().GetNamespace())
					}
					switch w := obj.(type) {
					case *appsv1.Deployment:
						templates[kind+" "+name] = &w.Spec.Template
					case *appsv1.StatefulSet:
						templates[kind+" "+name] = &w.Spec.Template
					}
				}
			}
			for name, tmpl := range templates {
				if r := policy.AggregateCheckResults(restricted.EvaluatePod(psa.LevelVersion{Level: psa.LevelRestricted, Version: psa.LatestVersion()}, &tmpl.ObjectMeta, &tmpl.Spec)); !r.Allowed {
					t.Errorf("%s violates PodSecurity restricted: %s", name, r.ForbiddenDetail())
				}
				checkReferences(t, objects, external, name, tmpl.Spec)
			}
			checkAPI(t, objects, external)
			for name, np := range objects["NetworkPolicy"] {
				sel := np.(*networkingv1.NetworkPolicy).Spec.PodSelector
				if len(sel.MatchLabels) > 0 && !selectsAny(t, &sel, templates) {
					t.Errorf("NetworkPolicy %s selects no pod", name)
				}
			}
		})
	}
}

// checkReferences checks that the ConfigMaps and Secrets a pod names are
// rendered (or are the platform's), and that each *_FILE setting names a
// key of a mounted Secret.
func checkReferences(t *testing.T, objects rendered, external []string, pod string, spec corev1.PodSpec) {
	t.Helper()
	secrets := map[string]*corev1.Secret{} // volume -> its Secret, nil if the platform's
	for _, v := range spec.Volumes {
		if v.Secret == nil {
			continue
		}
		secret, ok := objects["Secret"][v.Secret.SecretName].(*corev1.Secret)
		if !ok && !slices.Contains(external, v.Secret.SecretName) {
			t.Errorf("%s: volume %s names Secret %s, which is not rendered", pod, v.Name, v.Secret.SecretName)
		}
		secrets[v.Name] = secret
	}
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		mounts := map[string]*corev1.Secret{} // this container's mount path -> the Secret
		for _, m := range c.VolumeMounts {
			if secret, ok := secrets[m.Name]; ok {
				mounts[m.MountPath] = secret
			}
		}
		for name, value := range containerEnv(t, objects, pod, c) {
			if !strings.HasSuffix(name, "_FILE") {
				continue
			}
			secret, mounted := mounts[path.Dir(value)]
			if !mounted {
				t.Errorf("%s: %s=%s is in no mounted Secret", pod, name, value)
			} else if secret != nil && secret.StringData[path.Base(value)] == "" && secret.Data[path.Base(value)] == nil {
				t.Errorf("%s: %s=%s: Secret %s has no key %s", pod, name, value, secret.Name, path.Base(value))
			}
		}
	}
}

// containerEnv is a container's environment: its ConfigMaps' data, then
// its own values (a container resource from the downward API as
// "<resource>", as "<limits.memory>").
func containerEnv(t *testing.T, objects rendered, pod string, c corev1.Container) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, from := range c.EnvFrom {
		if from.ConfigMapRef == nil {
			continue
		}
		cm, ok := objects["ConfigMap"][from.ConfigMapRef.Name].(*corev1.ConfigMap)
		if !ok {
			t.Errorf("%s: container %s names ConfigMap %s, which is not rendered", pod, c.Name, from.ConfigMapRef.Name)
			continue
		}
		for k, v := range cm.Data {
			env[k] = v
		}
	}
	for _, e := range c.Env {
		env[e.Name] = e.Value
		if e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil {
			env[e.Name] = "<" + e.ValueFrom.ResourceFieldRef.Resource + ">"
		}
	}
	return env
}

// checkAPI checks the API's Deployment and what points at it.
func checkAPI(t *testing.T, objects rendered, external []string) {
	t.Helper()
	d := get[*appsv1.Deployment](t, objects, "Deployment", "items")
	spec := d.Spec.Template.Spec
	// The autoscaler holds the number of pods: a Deployment that named
	// one would be set back to it by every apply.
	if d.Spec.Replicas != nil || d.Spec.Strategy.RollingUpdate.MaxUnavailable.IntValue() != 0 {
		t.Errorf("Deployment items: replicas %v, maxUnavailable %v; want none (the autoscaler's) and 0", d.Spec.Replicas, d.Spec.Strategy.RollingUpdate.MaxUnavailable)
	}
	if len(spec.InitContainers) != 1 || !slices.Equal(spec.InitContainers[0].Args, []string{"migrate"}) || len(spec.Containers) != 1 {
		t.Fatalf("Deployment items: want one init container running migrate and one container, the API")
	}
	api := spec.Containers[0]
	if spec.InitContainers[0].Image != api.Image {
		t.Errorf("migrations from image %s, the API from %s", spec.InitContainers[0].Image, api.Image)
	}

	// The configuration must be one the service takes (files exist for
	// the *_FILE settings), with migrations left to the init container.
	env := containerEnv(t, objects, "Deployment items", api)
	dir := t.TempDir()
	for name, value := range env {
		if strings.HasSuffix(name, "_FILE") {
			env[name] = filepath.Join(dir, path.Base(value))
			os.WriteFile(env[name], []byte("password\n"), 0o600)
		}
	}
	if got := env["GOMEMLIMIT"]; got != "<limits.memory>" || api.Resources.Limits.Memory().IsZero() {
		t.Errorf("GOMEMLIMIT is %s with a memory limit of %v; want the memory limit, from the downward API", got, api.Resources.Limits.Memory())
	}
	delete(env, "GOMEMLIMIT")
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("the API's configuration is refused: %v", err)
	}
	if cfg.MigrateOnStart {
		t.Error("the API migrates on start; only its init container should")
	}

	port := func(probe *corev1.Probe, want string) {
		t.Helper()
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != want || probe.HTTPGet.Port.String() != "http" {
			t.Errorf("probe %+v, want GET %s on port http", probe, want)
		}
	}
	port(api.StartupProbe, "/health")
	port(api.LivenessProbe, "/health")
	port(api.ReadinessProbe, "/ready")
	if len(api.Ports) != 1 || int(api.Ports[0].ContainerPort) != cfg.Port || api.Ports[0].Name != "http" ||
		d.Spec.Template.Annotations["prometheus.io/port"] != fmt.Sprint(cfg.Port) {
		t.Errorf("ports %v and scrape annotations %v; want http on PORT=%d", api.Ports, d.Spec.Template.Annotations, cfg.Port)
	}
	// The service serves on after SIGTERM while the endpoints drop the
	// pod (no preStop does), and the kubelet's grace period covers that
	// and the shutdown: else SIGKILL cuts requests off.
	wait := int64((cfg.ShutdownDelay + cfg.ShutdownTimeout) / time.Second)
	if cfg.ShutdownDelay < 5*time.Second || api.Lifecycle != nil || *spec.TerminationGracePeriodSeconds <= wait {
		t.Errorf("SHUTDOWN_DELAY %v, lifecycle %v, terminationGracePeriodSeconds %d; want a delay of 5 s or more, no preStop, a grace period above SHUTDOWN_DELAY + SHUTDOWN_TIMEOUT = %d s",
			cfg.ShutdownDelay, api.Lifecycle, *spec.TerminationGracePeriodSeconds, wait)
	}
	if sc := spec.SecurityContext; *sc.RunAsUser != 65532 || *sc.RunAsGroup != 65532 || !*api.SecurityContext.ReadOnlyRootFilesystem {
		t.Errorf("the API runs as %d:%d, read-only root %v; want 65532:65532 (the image's USER), read-only", *sc.RunAsUser, *sc.RunAsGroup, *api.SecurityContext.ReadOnlyRootFilesystem)
	}

	pods := map[string]*corev1.PodTemplateSpec{"Deployment items": &d.Spec.Template}
	svc := get[*corev1.Service](t, objects, "Service", "items")
	if !selectsAny(t, &metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, pods) || svc.Spec.Ports[0].TargetPort.String() != "http" {
		t.Errorf("Service items selects %v on port %v, not the API's pods on http", svc.Spec.Selector, svc.Spec.Ports[0].TargetPort)
	}
	// With PostgreSQL down no pod is Ready; a drain must still go on.
	pdb := get[*policyv1.PodDisruptionBudget](t, objects, "PodDisruptionBudget", "items")
	if !selectsAny(t, pdb.Spec.Selector, pods) || pdb.Spec.UnhealthyPodEvictionPolicy == nil || *pdb.Spec.UnhealthyPodEvictionPolicy != policyv1.AlwaysAllow {
		t.Errorf("PodDisruptionBudget items selects %v, unhealthy pods %v; want the API's pods, AlwaysAllow", pdb.Spec.Selector, pdb.Spec.UnhealthyPodEvictionPolicy)
	}
	hpa := get[*autoscalingv2.HorizontalPodAutoscaler](t, objects, "HorizontalPodAutoscaler", "items")
	if ref := hpa.Spec.ScaleTargetRef; ref.Kind != "Deployment" || ref.Name != d.Name || *hpa.Spec.MinReplicas != 3 {
		t.Errorf("HorizontalPodAutoscaler scales %s %s from %d; want the Deployment, from 3", ref.Kind, ref.Name, *hpa.Spec.MinReplicas)
	}
}

// selectsAny reports whether sel selects one of the pod templates.
func selectsAny(t *testing.T, sel *metav1.LabelSelector, templates map[string]*corev1.PodTemplateSpec) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Fatal(err)
	}
	for _, tmpl := range templates {
		if s.Matches(labels.Set(tmpl.Labels)) {
			return true
		}
	}
	return false
}

// TestRolloutUnderLoad is the load of .ci/k8s-lab-check, skipped unless
// ITEMS_K8S_LAB=1: with kubectl on PATH reaching a cluster where the dev
// overlay runs in namespace items, and whose pod IPs this machine reaches.
// Clients send a steady mix of reads, updates and creates over kept-alive
// connections, each made to one of the Ready endpoints of the Service
// items as the EndpointSlices list them, re-read on every change through a
// watch: as kube-proxy balances connections, not requests. Meanwhile the
// Deployment rolls out ITEMS_K8S_NEW_IMAGE, and then one of its pods is
// deleted. Every request must succeed.
func TestRolloutUnderLoad(t *testing.T) {
	if os.Getenv("ITEMS_K8S_LAB") != "1" {
		t.Skip("the check of a real cluster: .ci/k8s-lab-check runs it")
	}
	kubectl := func(args ...string) string {
		t.Helper()
		out, err := exec.CommandContext(t.Context(), "kubectl", append([]string{"-n", "items"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	// kubectl proxy: the API server over plain HTTP, with kubectl's
	// credentials.
	proxy := exec.CommandContext(t.Context(), "kubectl", "proxy", "--port=0")
	stdout, _ := proxy.StdoutPipe()
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Process.Kill(); proxy.Wait() })
	line, _ := bufio.NewReader(stdout).ReadString('\n') // "Starting to serve on 127.0.0.1:PORT"
	api := "http://" + strings.TrimSpace(line[strings.LastIndex(line, " ")+1:])

	var eps endpoints
	go eps.watch(t, api+"/apis/discovery.k8s.io/v1/namespaces/items/endpointslices?labelSelector="+url.QueryEscape("kubernetes.io/service-name=items"))
	waitFor(t, "3 Ready endpoints", func() bool { return len(eps.get()) == 3 })

	var dialMu sync.Mutex
	dials := map[string]int{} // connections made, by endpoint
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		MaxIdleConnsPerHost: 16,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			ready := eps.get()
			if len(ready) == 0 {
				return nil, errors.New("no Ready endpoint")
			}
			addr := ready[rand.IntN(len(ready))]
			dialMu.Lock()
			dials[addr]++
			dialMu.Unlock()
			return (&net.Dialer{Timeout: 2 * time.Second}).DialContext(ctx, network, addr)
		},
	}}
	send := func(method, path, body string) (int, error) {
		req, _ := http.NewRequest(method, "http://items"+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		res, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		return res.StatusCode, nil
	}
	var ids []int64
	for i := range 16 {
		ids = append(ids, createItem(t, "http://"+eps.get()[0], fmt.Sprintf(`{"name":"seed %d"}`, i)).ID)
	}
	// serving lists the API's pods that are not being deleted.
	serving := func() (names, ips []string) {
		var pods corev1.PodList
		if err := json.Unmarshal([]byte(kubectl("get", "pods", "-l", "app.kubernetes.io/component=api", "-o", "json")), &pods); err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			if p.DeletionTimestamp == nil {
				names, ips = append(names, "pod/"+p.Name), append(ips, p.Status.PodIP)
			}
		}
		return names, ips
	}
	// gone waits until none of ips is a Ready endpoint and 3 are.
	gone := func(ips []string) {
		waitFor(t, fmt.Sprintf("3 Ready endpoints, none of %v", ips), func() bool {
			ready := eps.get()
			return len(ready) == 3 && !slices.ContainsFunc(ready, func(a string) bool {
				host, _, _ := net.SplitHostPort(a)
				return slices.Contains(ips, host)
			})
		})
	}

	// The load: 8 clients, each as fast as it is answered; every tenth
	// request a POST, two a PUT, the rest GETs.
	var mu sync.Mutex
	var sent, failed int
	var failures []string
	stop := make(chan struct{})
	wait := loadClients(8, stop, func(w, n int) bool {
		id := ids[(w*7+n)%len(ids)]
		method, path, body, want := "GET", fmt.Sprintf("/items/%d", id), "", 200
		switch n % 10 {
		case 0:
			method, path, body, want = "POST", "/items", fmt.Sprintf(`{"name":"load %d-%d"}`, w, n), 201
		case 1, 2:
			method, body = "PUT", fmt.Sprintf(`{"name":"put %d-%d"}`, w, n)
		}
		status, err := send(method, path, body)
		mu.Lock()
		defer mu.Unlock()
		sent++
		if err != nil || status != want {
			failed++
			failures = append(failures, fmt.Sprintf("%s %s: %d %v", method, path, status, err))
		}
		return true
	})
	phase := func(name string, run func()) {
		t.Helper()
		mu.Lock()
		sent0, failed0, changes0 := sent, failed, eps.changes.Load()
		mu.Unlock()
		start := time.Now()
		run()
		elapsed := time.Since(start)
		mu.Lock()
		n, f := sent-sent0, failed-failed0
		mu.Unlock()
		t.Logf("%s: %.1f s, %d requests (%.0f/s), %d failed; the endpoints changed %d times", name, elapsed.Seconds(), n, float64(n)/elapsed.Seconds(), f, eps.changes.Load()-changes0)
	}
	phase("steady load", func() { time.Sleep(3 * time.Second) })
	// Each phase ends once the pods that left are gone: their shutdown
	// falls inside it.
	old, oldIPs := serving()
	phase(fmt.Sprintf("rolling update to %s (%d pods replaced)", os.Getenv("ITEMS_K8S_NEW_IMAGE"), len(old)), func() {
		kubectl("set", "image", "deployment/items", "api="+os.Getenv("ITEMS_K8S_NEW_IMAGE"), "migrate="+os.Getenv("ITEMS_K8S_NEW_IMAGE"))
		kubectl("rollout", "status", "deployment/items", "--timeout=300s")
		kubectl(append([]string{"wait", "--for=delete", "--timeout=120s"}, old...)...)
		gone(oldIPs)
	})
	phase("steady load", func() { time.Sleep(3 * time.Second) })
	pods, ips := serving()
	phase(pods[0]+" deleted and replaced", func() {
		kubectl("delete", pods[0], "--wait=true", "--timeout=120s")
		kubectl("wait", "--for=jsonpath={.status.readyReplicas}=3", "deployment/items", "--timeout=120s")
		gone(ips[:1])
	})
	phase("steady load", func() { time.Sleep(3 * time.Second) })
	close(stop)
	wait()
	t.Logf("in all: %d requests, %d failed; connections made, by pod: %v", sent, failed, dials)
	for _, f := range failures[:min(len(failures), 10)] {
		t.Errorf("failed: %s", f)
	}
}

// endpoints are the Ready addresses (ip:port) of a Service's
// EndpointSlices, kept by a watch.
type endpoints struct {
	ready   atomic.Pointer[[]string]
	changes atomic.Int64 // times the list changed
}

func (e *endpoints) get() []string {
	if p := e.ready.Load(); p != nil {
		return *p
	}
	return nil
}

// watch lists the EndpointSlices at url, then watches them from the list's
// resourceVersion, listing again when the watch ends, until the test ends.
func (e *endpoints) watch(t *testing.T, url string) {
	bySlice := map[string][]string{}
	publish := func() {
		var all []string
		for _, addrs := range bySlice {
			all = append(all, addrs...)
		}
		slices.Sort(all)
		if old := e.get(); !slices.Equal(old, all) {
			e.ready.Store(&all)
			e.changes.Add(1)
		}
	}
	ready := func(s discoveryv1.EndpointSlice) []string {
		var addrs []string
		for _, p := range s.Ports {
			for _, ep := range s.Endpoints {
				if ep.Conditions.Ready == nil || *ep.Conditions.Ready {
					for _, a := range ep.Addresses {
						addrs = append(addrs, net.JoinHostPort(a, fmt.Sprint(*p.Port)))
					}
				}
			}
		}
		return addrs
	}
	for t.Context().Err() == nil {
		var list discoveryv1.EndpointSliceList
		if err := getJSON(t.Context(), url, &list); err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		clear(bySlice)
		for _, s := range list.Items {
			bySlice[s.Name] = ready(s)
		}
		publish()
		req, _ := http.NewRequestWithContext(t.Context(), "GET", url+"&watch=1&resourceVersion="+list.ResourceVersion, nil)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			continue
		}
		dec := json.NewDecoder(res.Body)
		for {
			var ev struct {
				Type   string
				Object discoveryv1.EndpointSlice
			}
			if dec.Decode(&ev) != nil {
				break
			}
			switch ev.Type {
			case "ADDED", "MODIFIED":
				bySlice[ev.Object.Name] = ready(ev.Object)
			case "DELETED":
				delete(bySlice, ev.Object.Name)
			}
			publish()
		}
		res.Body.Close()
	}
}

func getJSON(ctx context.Context, url string, v any) error {
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s", url, res.Status)
	}
	return json.NewDecoder(res.Body).Decode(v)
}
