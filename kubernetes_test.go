package main

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
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

func renderOverlay(t *testing.T, name string) rendered {
	t.Helper()
	resources, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), filepath.Join("deploy", "overlays", name))
	if err != nil {
		t.Fatalf("kustomize deploy/overlays/%s: %v", name, err)
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
	for overlay, external := range overlays {
		t.Run(overlay, func(t *testing.T) {
			objects := renderOverlay(t, overlay)
			ns := get[*corev1.Namespace](t, objects, "Namespace", "items")
			if level := ns.Labels[psa.EnforceLevelLabel]; level != string(psa.LevelRestricted) {
				t.Errorf("namespace items enforces %q, want restricted", level)
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
	mounts := map[string]*corev1.Secret{} // mount path -> the Secret, nil if the platform's
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		for _, v := range spec.Volumes {
			if v.Secret == nil {
				continue
			}
			secret, ok := objects["Secret"][v.Secret.SecretName].(*corev1.Secret)
			if !ok && !slices.Contains(external, v.Secret.SecretName) {
				t.Errorf("%s: volume %s names Secret %s, which is not rendered", pod, v.Name, v.Secret.SecretName)
			}
			for _, m := range c.VolumeMounts {
				if m.Name == v.Name {
					mounts[m.MountPath] = secret
				}
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
	if *d.Spec.Replicas != 3 || d.Spec.Strategy.RollingUpdate.MaxUnavailable.IntValue() != 0 {
		t.Errorf("Deployment items: %d replicas, maxUnavailable %v; want 3 and 0", *d.Spec.Replicas, d.Spec.Strategy.RollingUpdate.MaxUnavailable)
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
	// The kubelet's grace period covers the preStop wait, then the
	// service's own shutdown: else SIGKILL cuts requests off.
	if api.Lifecycle == nil || api.Lifecycle.PreStop == nil || api.Lifecycle.PreStop.Sleep == nil {
		t.Fatal("the API has no preStop sleep")
	}
	wait := int64(api.Lifecycle.PreStop.Sleep.Seconds) + int64(cfg.ShutdownTimeout.Seconds())
	if *spec.TerminationGracePeriodSeconds <= wait {
		t.Errorf("terminationGracePeriodSeconds %d is not above preStop + SHUTDOWN_TIMEOUT = %d s", *spec.TerminationGracePeriodSeconds, wait)
	}
	if sc := spec.SecurityContext; *sc.RunAsUser != 65532 || *sc.RunAsGroup != 65532 || !*api.SecurityContext.ReadOnlyRootFilesystem {
		t.Errorf("the API runs as %d:%d, read-only root %v; want 65532:65532 (the image's USER), read-only", *sc.RunAsUser, *sc.RunAsGroup, *api.SecurityContext.ReadOnlyRootFilesystem)
	}

	pods := map[string]*corev1.PodTemplateSpec{"Deployment items": &d.Spec.Template}
	svc := get[*corev1.Service](t, objects, "Service", "items")
	if !selectsAny(t, &metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, pods) || svc.Spec.Ports[0].TargetPort.String() != "http" {
		t.Errorf("Service items selects %v on port %v, not the API's pods on http", svc.Spec.Selector, svc.Spec.Ports[0].TargetPort)
	}
	if pdb := get[*policyv1.PodDisruptionBudget](t, objects, "PodDisruptionBudget", "items"); !selectsAny(t, pdb.Spec.Selector, pods) {
		t.Errorf("PodDisruptionBudget items selects %v, not the API's pods", pdb.Spec.Selector)
	}
	hpa := get[*autoscalingv2.HorizontalPodAutoscaler](t, objects, "HorizontalPodAutoscaler", "items")
	if ref := hpa.Spec.ScaleTargetRef; ref.Kind != "Deployment" || ref.Name != d.Name || *hpa.Spec.MinReplicas != *d.Spec.Replicas {
		t.Errorf("HorizontalPodAutoscaler scales %s %s from %d; want the Deployment, from its %d", ref.Kind, ref.Name, *hpa.Spec.MinReplicas, *d.Spec.Replicas)
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
